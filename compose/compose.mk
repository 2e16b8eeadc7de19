# Compose deployment targets. The root Makefile includes this file (`include compose/compose.mk`).
#   make certs           CA + per-service mTLS certificates + MongoDB key file in compose/certs/
#   make compose-env     compose/.env and compose/*.env from the examples, with fresh secrets
#   make compose-config  validate the compose file (docker compose config)
#   make compose-validate  the same without Docker (compose-go, the loader behind docker compose)
#   make compose-up      build the image and start everything; make compose-down stops it
#   make compose-status  `otpgate status` inside the deployment
#   make alerts-test     promtool check + unit tests of the Prometheus alerts
COMPOSE_DIR := compose
COMPOSE := docker compose -f $(COMPOSE_DIR)/docker-compose.yml --project-directory $(COMPOSE_DIR)
PROMTOOL ?= promtool

.PHONY: certs compose-env compose-config compose-validate compose-up compose-down compose-status compose-logs alerts-test configref

certs: ## compose: CA, per-service mTLS certificates and the MongoDB key file (compose/certs/)
	$(COMPOSE_DIR)/certs.sh

compose-env: $(STAMP)/python ## compose: write compose/.env and compose/*.env with fresh secrets
	$(COMPOSE_DIR)/init-env.sh $(CURDIR)/$(BIN)/otpgate

compose-config: ## compose: validate compose/docker-compose.yml
	$(COMPOSE) config --quiet

compose-up: certs compose-env ## compose: build the image and start the deployment
	$(COMPOSE) up -d --build --wait

compose-down: ## compose: stop the deployment (data volumes are kept)
	$(COMPOSE) down

compose-status: ## compose: health of every service and the database, from inside
	$(COMPOSE) run --rm cli status

compose-logs: ## compose: follow the services' logs
	$(COMPOSE) logs -f edge delivery verification directory botgateway

alerts-test: ## promtool: check and unit-test the Prometheus alerts
	$(PROMTOOL) check rules $(COMPOSE_DIR)/prometheus/alerts.yml
	$(PROMTOOL) test rules $(COMPOSE_DIR)/prometheus/alerts_test.yml

configref: $(STAMP)/python ## regenerate docs/configuration.md from the config definitions
	$(BIN)/python tools/configref.py

COMPOSECHECK := .cache/bin/composecheck

$(COMPOSECHECK): compose/composecheck/main.go compose/composecheck/go.mod compose/composecheck/go.sum
	cd compose/composecheck && go build -o $(CURDIR)/$(COMPOSECHECK) .

compose-validate: $(COMPOSECHECK) ## compose: validate the compose file without Docker (compose-go, as `docker compose config`)
	@tmp=$$(mktemp -d) && cp -r $(COMPOSE_DIR)/. $$tmp/ && \
	  for f in $$tmp/.env.example $$tmp/*.env.example; do [ -e "$${f%.example}" ] || cp "$$f" "$${f%.example}"; done && \
	  $(COMPOSECHECK) $$tmp/docker-compose.yml $$tmp >/dev/null && echo "compose file OK"; rc=$$?; rm -rf $$tmp; exit $$rc
