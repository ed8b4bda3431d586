"""genderrec: train, compare, bulk-label and serve face gender classifiers on Ray with Keras 3.

Importing the package keeps TensorFlow's C++ start-up messages quiet in this process (:mod:`genderrec.tflogs`);
every Ray worker that runs genderrec code imports it first.
"""

from genderrec import tflogs

tflogs.install()
