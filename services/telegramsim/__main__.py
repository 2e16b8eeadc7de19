"""`python -m services.telegramsim` (dev and sandbox mode only)."""

from services.core.bootstrap import service_main
from services.telegramsim.app import build_app, load_config

service_main("telegramsim", load_config, build_app)
