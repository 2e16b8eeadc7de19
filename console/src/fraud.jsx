// The fraud guard (admin): the ranges and client segments it asked CAPTCHAs for or refused
// (ListFraudEvents), and the operators' prefix rules (safe list and block list) with their changes.
import { useEffect, useState } from "preact/hooks";
import { call, get, post } from "./api.js";
import { ErrorBox, Field, Notice, Pager, usePaged, when } from "./ui.jsx";

const KINDS = {
  FRAUD_EVENT_KIND_PREFIX: "prefix",
  FRAUD_EVENT_KIND_RANGE: "range",
  FRAUD_EVENT_KIND_CLIENT_COUNTRY: "client and country",
};
const STATES = {
  FRAUD_STATE_CAPTCHA: ["CAPTCHA asked", "wait"],
  FRAUD_STATE_BLOCK: ["refused", "bad"],
};
const ACTIONS = {
  FRAUD_RULE_ACTION_ALLOW: ["always allowed", "ok"],
  FRAUD_RULE_ACTION_BLOCK: ["always blocked", "bad"],
};

/** rule.prefix -> prefix, as the form names its fields. */
function ruleViolations(violations) {
  const out = {};
  for (const [path, text] of Object.entries(violations || {})) out[path.replace(/^rule\./, "")] = text;
  return out;
}

export function FraudGuard({ me }) {
  const [mine, setMine] = useState(false);
  const [draft, setDraft] = useState(null);
  const events = usePaged(
    async (token) => {
      const reply = await get("/v1/fraudEvents", { pageSize: 50, pageToken: token, clientId: mine ? me.client.id : "" });
      return { items: reply.events || [], next: reply.nextPageToken };
    },
    [mine],
  );
  const [rulesVersion, setRulesVersion] = useState(0);
  // What the last rule change did (a save or a removal), shown above the rules.
  const [changed, setChanged] = useState("");
  return (
    <section>
      <h1>Fraud guard</h1>
      <p class="muted">
        Number ranges and client segments the fraud guard asked CAPTCHAs for or refused SMS to in the last 7 days,
        the most recently seen first. Counts are those of the ten minutes before it was last seen.
      </p>
      <label class="check">
        <input type="checkbox" checked={mine} onChange={(e) => setMine(e.currentTarget.checked)} id="fraud-mine" />
        Only events last seen for {me.client.displayName}
      </label>
      <ErrorBox error={events.error} />
      {events.items.length === 0 && !events.busy && !events.error ? (
        <p class="empty">No guard events: the fraud guard asked for no CAPTCHA and refused no SMS in these days.</p>
      ) : (
        <div class="scroll">
          <table aria-busy={events.busy}>
            <caption class="sr-only">Fraud guard events</caption>
            <thead>
              <tr>
                <th scope="col">Range or segment</th>
                <th scope="col">State</th>
                <th scope="col">Signal</th>
                <th scope="col">Asked / SMS / entered</th>
                <th scope="col">Since</th>
                <th scope="col">Last seen</th>
                <th scope="col">
                  <span class="sr-only">Action</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {events.items.map((e) => {
                const [state, tone] = STATES[e.state] || ["unknown", "bad"];
                const numbers = e.kind !== "FRAUD_EVENT_KIND_CLIENT_COUNTRY";
                return (
                  <tr key={`${e.kind}|${e.value}`}>
                    <th scope="row">
                      <span class="mono">{e.value}</span>
                      <span class="muted"> {KINDS[e.kind] || "segment"}{e.region ? `, ${e.region}` : ""}</span>
                    </th>
                    <td>
                      <span class={`badge ${tone}`}>{state}</span>
                    </td>
                    <td>
                      <span class="mono">{e.signal}</span>
                      <span class="muted"> {Number(e.score || 0).toFixed(1)} nats</span>
                    </td>
                    <td>
                      {e.requests || 0} / {e.sms || 0} / {e.entered || 0}
                    </td>
                    <td>
                      <time datetime={e.since}>{when(e.since)}</time>
                    </td>
                    <td>
                      <time datetime={e.lastSeen}>{when(e.lastSeen)}</time>
                    </td>
                    <td>
                      {numbers && (
                        <button
                          type="button"
                          class="quiet"
                          aria-label={`Set a rule for ${e.value}`}
                          onClick={() => setDraft({ prefix: e.value, clientId: "" })}
                        >
                          Set a rule…
                        </button>
                      )}
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
      <Pager paged={events} noun="Fraud event" />
      <RuleForm
        me={me}
        draft={draft}
        onSaved={(rule) => {
          setChanged(
            `${rule.prefix} is ${ACTIONS[rule.action]?.[0] || "ruled"} ${rule.clientId ? "for this client" : "for every client"}.`,
          );
          setRulesVersion(rulesVersion + 1);
        }}
      />
      <Rules
        version={rulesVersion}
        changed={changed}
        onRemoved={(rule) => setChanged(`The rule for ${rule.prefix} is removed; the guard scores its numbers again.`)}
      />
    </section>
  );
}

function RuleForm({ me, draft, onSaved }) {
  const [form, setForm] = useState({ prefix: "", action: "FRAUD_RULE_ACTION_ALLOW", mineOnly: false, reason: "" });
  const [error, setError] = useState(null);
  useEffect(() => {
    // "Set a rule…" on an event fills in its prefix; what is left to say is why.
    if (!draft) return;
    setForm((current) => ({ ...current, prefix: draft.prefix }));
    setError(null);
    document.getElementById("rule-reason")?.focus();
  }, [draft]);
  const bad = ruleViolations(error?.violations);
  const set = (name) => (e) =>
    setForm({ ...form, [name]: e.currentTarget.type === "checkbox" ? e.currentTarget.checked : e.currentTarget.value });

  async function submit(event) {
    event.preventDefault();
    setError(null);
    try {
      const rule = {
        prefix: form.prefix.trim(),
        action: form.action,
        reason: form.reason.trim(),
        clientId: form.mineOnly ? me.client.id : "",
      };
      const saved = (await post("/v1/fraudRules", rule)).rule;
      setForm({ ...form, reason: "" });
      onSaved(saved);
    } catch (err) {
      setError(err);
    }
  }

  return (
    <form onSubmit={submit} noValidate aria-labelledby="rule-title">
      <h2 id="rule-title">Allow or block a prefix</h2>
      <p class="muted">
        A rule decides before the guard scores a request: the longest matching prefix wins. Premium-rate and
        shared-cost numbers stay refused whatever a rule says.
      </p>
      <div class="pair">
        <Field id="rule-prefix" label="Prefix" hint="E.164, from the country code on, e.g. +4915112" error={bad.prefix}>
          {(attrs) => <input {...attrs} type="tel" value={form.prefix} onInput={set("prefix")} />}
        </Field>
        <Field id="rule-action" label="Rule" error={bad.action}>
          {(attrs) => (
            <select {...attrs} value={form.action} onChange={set("action")}>
              <option value="FRAUD_RULE_ACTION_ALLOW">Always allow (safe list)</option>
              <option value="FRAUD_RULE_ACTION_BLOCK">Always block</option>
            </select>
          )}
        </Field>
      </div>
      <Field id="rule-reason" label="Why" hint="Kept and logged with the rule." error={bad.reason}>
        {(attrs) => <input {...attrs} value={form.reason} onInput={set("reason")} />}
      </Field>
      <label class="check">
        <input type="checkbox" checked={form.mineOnly} onChange={set("mineOnly")} id="rule-mine" />
        Only for {me.client.displayName} (otherwise for every client)
      </label>
      <button type="submit">Save rule</button>
      {!Object.keys(bad).length && <ErrorBox error={error} />}
    </form>
  );
}

function Rules({ version, changed, onRemoved }) {
  const [error, setError] = useState(null);
  const rules = usePaged(async () => {
    const reply = await get("/v1/fraudRules");
    return { items: reply.rules || [], next: "" };
  }, [version]);

  async function remove(rule) {
    setError(null);
    try {
      await call("DELETE", `/v1/fraudRules/${encodeURIComponent(rule.prefix)}`, { query: { clientId: rule.clientId } });
      onRemoved(rule);
      rules.refresh();
    } catch (err) {
      setError(err);
    }
  }

  return (
    <>
      <h2>Prefix rules</h2>
      <ErrorBox error={rules.error || error} />
      {changed && <Notice>{changed}</Notice>}
      {rules.items.length === 0 && !rules.busy && !rules.error ? (
        <p class="empty">No rules: the guard decides alone.</p>
      ) : (
        <ul class="rows" aria-label="Prefix rules" aria-busy={rules.busy}>
          {rules.items.map((r) => {
            const [label, tone] = ACTIONS[r.action] || ["unknown", "bad"];
            const configured = r.createdBy === "config";
            return (
              <li key={`${r.clientId}|${r.prefix}`} class="row rule">
                <span class="mono">{r.prefix}</span>
                <span class={`badge ${tone}`}>{label}</span>
                <span class="muted">
                  {r.clientId ? `client ${r.clientId}` : "every client"} · {r.reason}
                  {r.createTime ? ` · ${when(r.createTime)} by key ${r.createdBy}` : ""}
                </span>
                {configured ? (
                  <span class="muted">from the configuration</span>
                ) : (
                  <button type="button" class="danger" onClick={() => remove(r)} aria-label={`Remove the rule for ${r.prefix}`}>
                    Remove
                  </button>
                )}
              </li>
            );
          })}
        </ul>
      )}
    </>
  );
}
