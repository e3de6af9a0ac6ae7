"""aibridge: an AI gateway built as mitmproxy addons."""

__version__ = "0.1.0"
