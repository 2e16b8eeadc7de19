"""otpgate.verification.v1.VerificationService: phone re-confirmation by SMS code and the client Verify API.

Modules: codes.py (the code engine both flows share), verify.py (Verify API), confirm.py (phone
re-confirmation), store.py (collections, indexes, counters), templates.py (en/ru texts),
sweeper.py (expiry, follow-ups, retention), service.py (thin servicer), app.py (wiring).
"""
