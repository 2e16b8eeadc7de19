// Send a test message or start a test verification, as a client's backend would.
import { useState } from "preact/hooks";
import { post } from "./api.js";
import { ErrorBox, Field, Notice } from "./ui.jsx";

const CHANNELS = [
  ["CHANNEL_AUTO", "Auto (Telegram, else SMS where allowed)"],
  ["CHANNEL_TELEGRAM", "Telegram only"],
  ["CHANNEL_SMS", "SMS only"],
  ["CHANNEL_TELEGRAM_GATEWAY", "Telegram Gateway only (a code, from Telegram's Verification Codes chat)"],
];

function ChannelSelect({ attrs, value, onChange }) {
  return (
    <select {...attrs} value={value} onChange={(e) => onChange(e.currentTarget.value)}>
      {CHANNELS.map(([v, label]) => (
        <option value={v} key={v}>
          {label}
        </option>
      ))}
    </select>
  );
}

function MessageForm() {
  const [phone, setPhone] = useState("");
  const [text, setText] = useState("Your code is 4821");
  const [code, setCode] = useState("4821");
  const [channel, setChannel] = useState("CHANNEL_AUTO");
  const [protect, setProtect] = useState(false);
  const [error, setError] = useState(null);
  const [sent, setSent] = useState(null);
  async function submit(event) {
    event.preventDefault();
    setError(null);
    setSent(null);
    try {
      const body = { phone: phone.trim(), text, channel, protectContent: protect, requestId: crypto.randomUUID() };
      if (code.trim()) body.code = code.trim();
      setSent((await post("/v1/messages", body)).message);
    } catch (err) {
      setError(err);
    }
  }
  const bad = error?.violations || {};
  return (
    <form onSubmit={submit} aria-labelledby="send-message-title">
      <h2 id="send-message-title">Send a test message</h2>
      <Field id="message-phone" label="Phone number" hint="E.164, e.g. +79991234567" error={bad.phone}>
        {(attrs) => <input {...attrs} type="tel" required value={phone} onInput={(e) => setPhone(e.currentTarget.value)} />}
      </Field>
      <Field id="message-text" label="Text" error={bad.text}>
        {(attrs) => <textarea {...attrs} required rows={3} value={text} onInput={(e) => setText(e.currentTarget.value)} />}
      </Field>
      <Field
        id="message-code"
        label="The code in it"
        hint="4 to 8 digits: what the Telegram Gateway sends (it sends codes, not texts)"
        error={bad.code}
      >
        {(attrs) => <input {...attrs} inputmode="numeric" value={code} onInput={(e) => setCode(e.currentTarget.value)} />}
      </Field>
      <Field id="message-channel" label="Channel" error={bad.channel}>
        {(attrs) => <ChannelSelect attrs={attrs} value={channel} onChange={setChannel} />}
      </Field>
      <label class="check">
        <input type="checkbox" checked={protect} onChange={(e) => setProtect(e.currentTarget.checked)} />
        Protect it (no forwarding or saving in Telegram)
      </label>
      <button type="submit">Send message</button>
      {!Object.keys(bad).length && <ErrorBox error={error} />}
      {sent && (
        <Notice>
          Accepted: <a href={`#/messages/${sent.id}`}>message {sent.id}</a> to {sent.phoneMasked} is{" "}
          {sent.status.replace("MESSAGE_STATUS_", "").toLowerCase()}.
        </Notice>
      )}
    </form>
  );
}

function VerificationForm() {
  const [phone, setPhone] = useState("");
  const [channel, setChannel] = useState("CHANNEL_AUTO");
  const [length, setLength] = useState("6");
  const [locale, setLocale] = useState("en");
  const [error, setError] = useState(null);
  const [started, setStarted] = useState(null);
  async function submit(event) {
    event.preventDefault();
    setError(null);
    setStarted(null);
    try {
      const body = { phone: phone.trim(), channel, codeLength: Number(length), locale };
      setStarted((await post("/v1/verifications", body)).verification);
    } catch (err) {
      setError(err);
    }
  }
  const bad = error?.violations || {};
  return (
    <form onSubmit={submit} aria-labelledby="start-verification-title">
      <h2 id="start-verification-title">Start a test verification</h2>
      <Field id="verify-phone" label="Phone number" hint="otpgate generates the code and sends it." error={bad.phone}>
        {(attrs) => <input {...attrs} type="tel" required value={phone} onInput={(e) => setPhone(e.currentTarget.value)} />}
      </Field>
      <Field id="verify-channel" label="Channel" error={bad.channel}>
        {(attrs) => <ChannelSelect attrs={attrs} value={channel} onChange={setChannel} />}
      </Field>
      <Field id="verify-length" label="Code length" error={bad.code_length}>
        {(attrs) => (
          <input {...attrs} type="number" min={4} max={10} value={length} onInput={(e) => setLength(e.currentTarget.value)} />
        )}
      </Field>
      <Field id="verify-locale" label="Language" error={bad.locale}>
        {(attrs) => (
          <select {...attrs} value={locale} onChange={(e) => setLocale(e.currentTarget.value)}>
            <option value="en">English</option>
            <option value="ru">Русский</option>
          </select>
        )}
      </Field>
      <button type="submit">Start verification</button>
      {!Object.keys(bad).length && <ErrorBox error={error} />}
      {started && (
        <Notice>
          Code sent to {started.phoneMasked}.{" "}
          <a href={`#/verifications/${started.id}`}>Open verification {started.id}</a> to check the code.
        </Notice>
      )}
    </form>
  );
}

export function TestSend() {
  return (
    <section>
      <h1>Send a test</h1>
      <div class="columns">
        <MessageForm />
        <VerificationForm />
      </div>
    </section>
  );
}
