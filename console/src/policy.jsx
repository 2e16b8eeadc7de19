// The client's delivery policy (admin). The API checks every value; its field violations are
// shown next to the fields they name (policy.daily_sms_cap -> the daily SMS cap field).
import { useEffect, useState } from "preact/hooks";
import { call, get } from "./api.js";
import { ErrorBox, Field, Notice, when } from "./ui.jsx";

const LIMITS = [
  ["client", "All requests of the client"],
  ["phone_short", "Per number, short window"],
  ["phone_daily", "Per number, per day"],
  ["ip_sms", "SMS per end-user IP"],
  ["session", "Per end-user session"],
  ["reachability", "Reachability checks"],
];
const CAPTCHA = [
  ["CAPTCHA_RULE_ON_RISK", "Only when the fraud guard asks"],
  ["CAPTCHA_RULE_SMS", "Every request that may send an SMS"],
  ["CAPTCHA_RULE_ALWAYS", "Every request"],
];
const FRAUD = [
  ["FRAUD_MODE_BLOCK", "Block suspicious SMS"],
  ["FRAUD_MODE_MONITOR", "Monitor only (log and count)"],
  ["FRAUD_MODE_OFF", "Off (line type checks stay on)"],
];
const MASK = [
  "allowedCountries",
  "smsCountries",
  "smsCountriesAny",
  "smsFallback",
  "defaultConfirmDays",
  "captchaRule",
  "dailySmsCap",
  "fraudMode",
  "allowCustomCode",
  "rateLimits",
];
const camel = (name) => name.replace(/_(\w)/g, (_, c) => c.toUpperCase());

function toForm(policy) {
  const limits = {};
  for (const [name] of LIMITS) {
    const limit = policy.rateLimits?.[camel(name)] || {};
    limits[name] = { limit: String(limit.limit ?? 0), window: limit.window ? String(parseFloat(limit.window)) : "" };
  }
  return {
    allowed_countries: (policy.allowedCountries || []).join(", "),
    sms_countries: (policy.smsCountries || []).join(", "),
    sms_countries_any: Boolean(policy.smsCountriesAny),
    sms_fallback: Boolean(policy.smsFallback),
    default_confirm_days: String(policy.defaultConfirmDays ?? 0),
    captcha_rule: policy.captchaRule === "CAPTCHA_RULE_UNSPECIFIED" ? "CAPTCHA_RULE_ON_RISK" : policy.captchaRule,
    daily_sms_cap: String(policy.dailySmsCap ?? 0),
    fraud_mode: policy.fraudMode === "FRAUD_MODE_UNSPECIFIED" ? "FRAUD_MODE_BLOCK" : policy.fraudMode,
    allow_custom_code: Boolean(policy.allowCustomCode),
    limits,
  };
}

const list = (text) =>
  text
    .split(/[\s,]+/)
    .map((s) => s.trim().toUpperCase())
    .filter(Boolean);
// Numbers go as typed: the API says what is wrong with them.
const number = (text) => (/^-?\d+$/.test(text.trim()) ? Number(text.trim()) : text.trim());

function toPolicy(form) {
  const rateLimits = {};
  for (const [name] of LIMITS) {
    const { limit, window } = form.limits[name];
    if (number(limit) === 0 && !window.trim()) continue;
    rateLimits[camel(name)] = { limit: number(limit), ...(window.trim() ? { window: `${window.trim()}s` } : {}) };
  }
  return {
    allowedCountries: list(form.allowed_countries),
    smsCountries: list(form.sms_countries),
    smsCountriesAny: form.sms_countries_any,
    smsFallback: form.sms_fallback,
    defaultConfirmDays: number(form.default_confirm_days),
    captchaRule: form.captcha_rule,
    dailySmsCap: number(form.daily_sms_cap),
    fraudMode: form.fraud_mode,
    allowCustomCode: form.allow_custom_code,
    rateLimits,
  };
}

/** policy.sms_countries[1] -> sms_countries; policy.rate_limits.ip_sms.window -> rate_limits.ip_sms.window */
export function violationsByField(violations) {
  const out = {};
  for (const [path, text] of Object.entries(violations || {})) {
    const key = path.replace(/^policy\./, "").replace(/\[\d+\]/g, "");
    out[key] = out[key] ? `${out[key]}; ${text}` : text;
  }
  return out;
}

export function Policy({ me }) {
  const path = `/v1/clients/${encodeURIComponent(me.client.id)}/policy`;
  const [form, setForm] = useState(null);
  const [updated, setUpdated] = useState("");
  const [error, setError] = useState(null);
  const [saved, setSaved] = useState(false);
  useEffect(() => {
    get(path).then((r) => {
      setForm(toForm(r.policy));
      setUpdated(r.policy.updateTime || "");
    }, setError);
  }, []);
  if (!form) return <section><h1>Policy</h1><ErrorBox error={error} /></section>;

  const bad = violationsByField(error?.violations);
  const set = (name) => (e) =>
    setForm({ ...form, [name]: e.currentTarget.type === "checkbox" ? e.currentTarget.checked : e.currentTarget.value });
  const setLimit = (name, part) => (e) =>
    setForm({ ...form, limits: { ...form.limits, [name]: { ...form.limits[name], [part]: e.currentTarget.value } } });

  async function save(event) {
    event.preventDefault();
    setSaved(false);
    setError(null);
    try {
      const reply = await call("PATCH", path, { query: { updateMask: MASK.join(",") }, body: toPolicy(form) });
      setForm(toForm(reply.policy));
      setUpdated(reply.policy.updateTime || "");
      setSaved(true);
    } catch (err) {
      setError(err);
    }
  }

  const text = (name, label, hint) => (
    <Field id={`policy-${name}`} label={label} hint={hint} error={bad[name]}>
      {(attrs) => <input {...attrs} value={form[name]} onInput={set(name)} />}
    </Field>
  );
  const check = (name, label) => (
    <label class="check">
      <input type="checkbox" checked={form[name]} onChange={set(name)} id={`policy-${name}`} /> {label}
    </label>
  );
  const choice = (name, label, options) => (
    <Field id={`policy-${name}`} label={label} error={bad[name]}>
      {(attrs) => (
        <select {...attrs} value={form[name]} onChange={set(name)}>
          {options.map(([value, text]) => (
            <option value={value} key={value}>
              {text}
            </option>
          ))}
        </select>
      )}
    </Field>
  );

  return (
    <section>
      <h1>Policy</h1>
      <p class="muted">{updated ? `Last changed ${when(updated)}.` : "Defaults: never changed."}</p>
      <form onSubmit={save} noValidate class="policy">
        <fieldset>
          <legend>Countries and SMS</legend>
          {text("allowed_countries", "Countries numbers may belong to", "ISO codes, e.g. DE, FR; empty: any")}
          {check("sms_fallback", "Fall back to SMS when the person has no bot")}
          {text("sms_countries", "Countries SMS may go to", "ISO codes; empty: none, unless any country is allowed")}
          {check("sms_countries_any", "SMS may go to any country")}
          {text("daily_sms_cap", "Daily SMS cap", "SMS per UTC day; 0: no cap")}
          {text("default_confirm_days", "Re-confirm numbers older than (days)", "0: never ask")}
        </fieldset>
        <fieldset>
          <legend>Fraud and CAPTCHA</legend>
          {choice("fraud_mode", "Fraud guard", FRAUD)}
          {choice("captcha_rule", "CAPTCHA", CAPTCHA)}
          {check("allow_custom_code", "Allow my own codes in verifications")}
        </fieldset>
        <fieldset>
          <legend>Rate limits (0 and no window: the service default)</legend>
          {LIMITS.map(([name, label]) => (
            <div class="pair" key={name}>
              <Field id={`policy-rate_limits-${name}-limit`} label={`${label}: at most`} error={bad[`rate_limits.${name}.limit`]}>
                {(attrs) => <input {...attrs} inputmode="numeric" value={form.limits[name].limit} onInput={setLimit(name, "limit")} />}
              </Field>
              <Field id={`policy-rate_limits-${name}-window`} label="per (seconds)" error={bad[`rate_limits.${name}.window`]}>
                {(attrs) => <input {...attrs} inputmode="numeric" value={form.limits[name].window} onInput={setLimit(name, "window")} />}
              </Field>
            </div>
          ))}
        </fieldset>
        <button type="submit">Save policy</button>
        {error && !Object.keys(bad).length && <ErrorBox error={error} />}
        {error && Object.keys(bad).length > 0 && (
          <p class="error" role="alert">
            Nothing was saved: {Object.keys(bad).length === 1 ? "one field needs" : "some fields need"} a fix (marked
            above).
          </p>
        )}
        {saved && <Notice>Saved. Every edge uses it within seconds.</Notice>}
      </form>
    </section>
  );
}
