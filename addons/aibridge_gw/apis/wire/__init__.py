"""Wire APIs: one request/response format each, independent of which provider serves it."""
