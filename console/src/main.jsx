// The otpgate console: a client's dashboard and, in sandbox mode, a simulated phone.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ApiError, get, setKey, signOut, signedIn } from "./api.js";
import { ErrorBox, Field } from "./ui.jsx";
import { Messages } from "./messages.jsx";
import { Verifications } from "./verifications.jsx";
import { TestSend } from "./testsend.jsx";
import { Usage } from "./usage.jsx";
import { Bots } from "./bots.jsx";
import { ApiKeys } from "./keys.jsx";
import { Policy } from "./policy.jsx";
import { FraudGuard } from "./fraud.jsx";
import { Phone } from "./phone.jsx";

const ADMIN = "API_KEY_SCOPE_ADMIN";
const VIEWS = [
  { path: "messages", label: "Messages", view: Messages },
  { path: "verifications", label: "Verifications", view: Verifications },
  { path: "test", label: "Send a test", view: TestSend },
  { path: "usage", label: "Usage", view: Usage },
  { path: "bots", label: "Bots", view: Bots },
  { path: "keys", label: "API keys", view: ApiKeys, admin: true },
  { path: "policy", label: "Policy", view: Policy, admin: true },
  { path: "fraud", label: "Fraud guard", view: FraudGuard, admin: true },
  { path: "phone", label: "Sandbox phone", view: Phone, sandbox: true },
];

function route() {
  const [path = "messages", ...rest] = window.location.hash.replace(/^#\/?/, "").split("/");
  return { path, id: decodeURIComponent(rest.join("/")) };
}

function SignIn({ onIn }) {
  const [key, setValue] = useState("");
  const [remember, setRemember] = useState(false);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);

  async function submit(event) {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const me = await get("/v1/apiKeys/current", {}, { key: key.trim() });
      setKey(key.trim(), remember);
      onIn(me);
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  }

  return (
    <main class="signin">
      <h1>otpgate console</h1>
      <p>Sign in with an API key of your client (from <code>otpgate clients create</code>).</p>
      <form onSubmit={submit}>
        <Field id="api-key" label="API key" hint="It stays in this tab and is sent only to this server.">
          {(attrs) => (
            <input
              {...attrs}
              type="password"
              autocomplete="off"
              spellcheck={false}
              placeholder="otpg_…"
              required
              value={key}
              onInput={(e) => setValue(e.currentTarget.value)}
            />
          )}
        </Field>
        <label class="check">
          <input type="checkbox" checked={remember} onChange={(e) => setRemember(e.currentTarget.checked)} />
          Keep me signed in while this tab is open
        </label>
        <ErrorBox error={error} />
        <button type="submit" disabled={busy || !key.trim()}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}

function App() {
  const [me, setMe] = useState(null);
  const [sandbox, setSandbox] = useState(false);
  const [where, setWhere] = useState(route());
  const [error, setError] = useState(null);

  useEffect(() => {
    const onHash = () => setWhere(route());
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, []);

  useEffect(() => {
    if (!signedIn() || me) return;
    get("/v1/apiKeys/current")
      .then(setMe)
      .catch((err) => {
        if (err instanceof ApiError && err.status === 401) signOut();
        setError(err);
      });
  }, [me]);

  useEffect(() => {
    // The sandbox routes exist only in sandbox mode: their presence is the answer.
    if (me) get("/sandbox/v1/users", { pageSize: 1 }).then(() => setSandbox(true), () => setSandbox(false));
  }, [me]);

  if (!signedIn() || (!me && error)) return <SignIn onIn={setMe} />;
  if (!me) return <p class="loading">Loading…</p>;

  const admin = me.apiKey.scopes.includes(ADMIN);
  const views = VIEWS.filter((v) => (!v.sandbox || sandbox));
  const current = views.find((v) => v.path === where.path) || views[0];
  const View = current.view;

  return (
    <div class="shell">
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header>
        <div class="brand">otpgate</div>
        <div class="who">
          <strong>{me.client.displayName}</strong>
          <span class="muted"> · key {me.apiKey.id}</span>
        </div>
        <button
          type="button"
          class="quiet"
          onClick={() => {
            signOut();
            setMe(null);
            window.location.hash = "";
          }}
        >
          Sign out
        </button>
      </header>
      <nav class="tabs" aria-label="Console sections">
        {views.map((v) => (
          <a href={`#/${v.path}`} aria-current={v === current ? "page" : undefined} key={v.path}>
            {v.label}
          </a>
        ))}
      </nav>
      <main id="main" tabindex="-1">
        {current.admin && !admin ? (
          <section>
            <h1>{current.label}</h1>
            <p>
              This view needs an API key with the admin scope; this key has{" "}
              {me.apiKey.scopes.map((s) => s.replace("API_KEY_SCOPE_", "").toLowerCase()).join(", ")}. An operator
              issues one with <code>otpgate apikeys create "{me.client.displayName}" --scope admin</code>.
            </p>
          </section>
        ) : (
          <View me={me} id={where.id} admin={admin} />
        )}
      </main>
    </div>
  );
}

render(<App />, document.getElementById("app"));
