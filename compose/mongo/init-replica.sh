#!/usr/bin/env bash
# One-shot init step (compose service `mongo-init`): initiate the replica set, wait for a primary,
# then create (or update) one user per otpgate service with readWrite on that service's database
# only, an operator user for `otpgate` CLI tasks (key rotation, clients), and the exporter's user.
# Safe to re-run: every step checks what exists first.
set -euo pipefail

: "${MONGO_HOST:=mongo:27017}"
: "${MONGO_REPLICA_SET:=rs0}"
: "${MONGO_ROOT_USERNAME:?}" "${MONGO_ROOT_PASSWORD:?}"

root_uri="mongodb://${MONGO_ROOT_USERNAME}:${MONGO_ROOT_PASSWORD}@${MONGO_HOST}/admin?directConnection=true"

for _ in $(seq 1 60); do
  mongosh --quiet "$root_uri" --eval 'db.adminCommand({ping: 1}).ok' >/dev/null 2>&1 && break
  sleep 1
done

script=$(cat <<JS
const rsName = "${MONGO_REPLICA_SET}";
try {
  rs.status();
  print("replica set already initiated");
} catch (e) {
  if (e.codeName !== "NotYetInitialized") throw e;
  rs.initiate({_id: rsName, members: [{_id: 0, host: "${MONGO_HOST}"}]});
  print("replica set initiated");
}
for (let i = 0; i < 120 && !db.hello().isWritablePrimary; i++) sleep(500);
if (!db.hello().isWritablePrimary) throw new Error("no primary after 60 s");

const admin = db.getSiblingDB("admin");
function ensureUser(name, pwd, roles) {
  if (!pwd) { print("skipping user " + name + ": no password set"); return; }
  if (admin.getUser(name)) {
    admin.updateUser(name, {pwd: pwd, roles: roles});
    print("updated user " + name);
  } else {
    admin.createUser({user: name, pwd: pwd, roles: roles});
    print("created user " + name);
  }
}
const services = ["edge", "delivery", "verification", "directory", "botgateway"];
const passwords = {
  edge: "${MONGO_EDGE_PASSWORD:-}",
  delivery: "${MONGO_DELIVERY_PASSWORD:-}",
  verification: "${MONGO_VERIFICATION_PASSWORD:-}",
  directory: "${MONGO_DIRECTORY_PASSWORD:-}",
  botgateway: "${MONGO_BOTGATEWAY_PASSWORD:-}",
};
for (const svc of services) {
  ensureUser("otpgate_" + svc, passwords[svc], [{role: "readWrite", db: "otpgate_" + svc}]);
}
ensureUser("otpgate_operator", "${MONGO_OPERATOR_PASSWORD:-}",
  services.map((svc) => ({role: "readWrite", db: "otpgate_" + svc})));
ensureUser("otpgate_exporter", "${MONGO_EXPORTER_PASSWORD:-}",
  [{role: "clusterMonitor", db: "admin"}, {role: "read", db: "local"}]);
JS
)
mongosh --quiet "$root_uri" --eval "$script"
echo "mongo-init: done"
