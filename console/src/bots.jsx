// Bots: the shared ones and the client's own; with an admin key, register one by its token.
import { useState } from "preact/hooks";
import { get, post } from "./api.js";
import { ErrorBox, Field, Notice, usePaged, when } from "./ui.jsx";

export function Bots({ me, admin }) {
  const paged = usePaged(async (token) => {
    const reply = await get("/v1/bots", { pageSize: 100, pageToken: token });
    return { items: reply.bots || [], next: reply.nextPageToken };
  }, []);
  return (
    <section>
      <h1>Bots</h1>
      <ErrorBox error={paged.error} />
      <ul class="rows">
        {paged.items.map((b) => (
          <li key={b.id} class="row">
            <span class="mono">@{b.username}</span>
            <span class={`badge ${b.shared ? "wait" : "ok"}`}>{b.shared ? "shared" : "your own"}</span>
            <span class="muted">since {when(b.createTime)}</span>
          </li>
        ))}
      </ul>
      {admin ? (
        <RegisterBot clientId={me.client.id} onDone={paged.refresh} />
      ) : (
        <p class="muted">Registering your own bot needs an admin-scope key.</p>
      )}
    </section>
  );
}

function RegisterBot({ clientId, onDone }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState(null);
  const [done, setDone] = useState(null);
  async function submit(event) {
    event.preventDefault();
    setError(null);
    setDone(null);
    try {
      const reply = await post("/v1/bots", { token: token.trim(), ownerClientId: clientId });
      setDone(reply.bot);
      setToken("");
      onDone();
    } catch (err) {
      setError(err);
    }
  }
  return (
    <form onSubmit={submit} aria-labelledby="register-title">
      <h2 id="register-title">Register your own bot</h2>
      <Field
        id="bot-token"
        label="Bot token from @BotFather"
        hint="Stored encrypted; never shown again."
        error={error?.violations?.token}
      >
        {(attrs) => (
          <input
            {...attrs}
            type="password"
            autocomplete="off"
            required
            value={token}
            onInput={(e) => setToken(e.currentTarget.value)}
          />
        )}
      </Field>
      <button type="submit">Register bot</button>
      {!error?.violations?.token && <ErrorBox error={error} />}
      {done && <Notice>@{done.username} is registered and sends for you.</Notice>}
    </form>
  );
}
