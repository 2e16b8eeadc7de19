"""`python -m services.botgateway`."""

from services.botgateway.app import build_app, load_config
from services.core.bootstrap import service_main

service_main("botgateway", load_config, build_app)
