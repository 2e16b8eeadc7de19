"""The directory: the encrypted phone number <-> Telegram user mapping, with per-bot link state."""
