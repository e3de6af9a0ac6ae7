"""The mitmproxy addons, in the order addons/aibridge.py chains them: one class per behaviour."""
