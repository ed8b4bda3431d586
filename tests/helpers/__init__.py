"""What tests and benchmarks share: composite photos of real faces, headless Chromium, a free port, test bundles.

Import as ``tests.helpers.<module>`` (pytest puts the repository root on ``sys.path``, see ``pythonpath`` in
pyproject.toml); no test module imports another.
"""
