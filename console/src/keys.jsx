// API keys of the client (admin): create one (its secret is shown once), revoke one.
import { useEffect, useState } from "preact/hooks";
import { get, post } from "./api.js";
import { ErrorBox, Notice, when } from "./ui.jsx";

const SCOPES = [
  ["API_KEY_SCOPE_MESSAGES_SEND", "send messages"],
  ["API_KEY_SCOPE_MESSAGES_READ", "read messages and usage"],
  ["API_KEY_SCOPE_VERIFY", "verify"],
  ["API_KEY_SCOPE_ADMIN", "admin (operator)"],
];

export function ApiKeys({ me }) {
  const base = `/v1/clients/${encodeURIComponent(me.client.id)}/apiKeys`;
  const [keys, setKeys] = useState([]);
  const [chosen, setChosen] = useState(SCOPES.slice(0, 3).map(([s]) => s));
  const [created, setCreated] = useState(null);
  const [error, setError] = useState(null);
  const load = () => get(base).then((r) => setKeys(r.apiKeys || []), setError);
  useEffect(() => {
    load();
  }, []);

  async function create(event) {
    event.preventDefault();
    setError(null);
    try {
      setCreated(await post(base, { scopes: chosen }));
      load();
    } catch (err) {
      setError(err);
    }
  }

  async function revoke(key) {
    if (key.id === me.apiKey.id && !window.confirm("This is the key you are signed in with. Revoke it?")) return;
    try {
      await post(`/v1/apiKeys/${encodeURIComponent(key.id)}:revoke`);
      load();
    } catch (err) {
      setError(err);
    }
  }

  return (
    <section>
      <h1>API keys</h1>
      <ErrorBox error={error} />
      <table>
        <thead>
          <tr>
            <th scope="col">Key id</th>
            <th scope="col">Scopes</th>
            <th scope="col">Last used</th>
            <th scope="col">
              <span class="sr-only">Action</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {keys.map((k) => (
            <tr key={k.id}>
              <th scope="row" class="mono">
                {k.id}
                {k.id === me.apiKey.id && <span class="muted"> (this one)</span>}
              </th>
              <td>{k.scopes.map((s) => s.replace("API_KEY_SCOPE_", "").toLowerCase()).join(", ")}</td>
              <td>{k.lastUseTime ? when(k.lastUseTime) : "never"}</td>
              <td>
                {k.revokeTime ? (
                  <span class="muted">revoked {when(k.revokeTime)}</span>
                ) : (
                  <button type="button" class="danger" onClick={() => revoke(k)} aria-label={`Revoke key ${k.id}`}>
                    Revoke
                  </button>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <form onSubmit={create} aria-labelledby="new-key-title">
        <h2 id="new-key-title">Create a key</h2>
        <fieldset>
          <legend>Scopes</legend>
          {SCOPES.map(([scope, label]) => (
            <label class="check" key={scope}>
              <input
                type="checkbox"
                checked={chosen.includes(scope)}
                onChange={(e) =>
                  setChosen(e.currentTarget.checked ? [...chosen, scope] : chosen.filter((s) => s !== scope))
                }
              />
              {label}
            </label>
          ))}
        </fieldset>
        <button type="submit" disabled={!chosen.length}>
          Create key
        </button>
      </form>
      {created && (
        <Notice>
          New key (shown only now; copy it somewhere safe): <code class="secret">{created.key}</code>{" "}
          <button type="button" class="quiet" onClick={() => navigator.clipboard?.writeText(created.key)}>
            Copy
          </button>{" "}
          <button type="button" class="quiet" onClick={() => setCreated(null)}>
            Hide
          </button>
        </Notice>
      )}
    </section>
  );
}
