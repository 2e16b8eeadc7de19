"""The edge: the public gRPC and HTTP/JSON API, API keys, per-key/IP limits and CAPTCHA checks."""
