// The sandbox phone (sandbox mode only): simulated Telegram users, their chats with each bot as a
// Telegram client shows them, Telegram's "Verification Codes" chat (codes of the Telegram Gateway;
// opening it marks them read), and the SMS inbox of their number. New messages arrive by polling
// every 1.5 s while the tab is visible (only what is newer than the last one seen).
import { useEffect, useRef, useState } from "preact/hooks";
import { get, post } from "./api.js";
import { ErrorBox, Field, usePoll, when } from "./ui.jsx";

const BLOCKED = "otpgate.console.blocked";

function blockedSet() {
  try {
    return new Set(JSON.parse(sessionStorage.getItem(BLOCKED) || "[]"));
  } catch {
    return new Set();
  }
}

export function Phone() {
  const [users, setUsers] = useState([]);
  const [selected, setSelected] = useState("");
  const [error, setError] = useState(null);
  const load = async () => {
    const reply = await get("/sandbox/v1/users", { pageSize: 1000 });
    setUsers(reply.users || []);
    setError(null);
    return reply.users || [];
  };
  useEffect(() => {
    load().catch(setError);
  }, []);
  const user = users.find((u) => u.userId === selected);
  return (
    <section>
      <h1>Sandbox phone</h1>
      <p class="muted">
        Play a Telegram user: press Start in a bot, share the number, read what arrives. Only in sandbox mode; nothing
        here reaches real Telegram or real phones.
      </p>
      <ErrorBox error={error} />
      <div class="phone-layout">
        <div class="people">
          <h2>People</h2>
          <ul class="people-list">
            {users.map((u) => (
              <li key={u.userId}>
                <button
                  type="button"
                  class={u.userId === selected ? "person selected" : "person"}
                  aria-pressed={u.userId === selected}
                  onClick={() => setSelected(u.userId)}
                >
                  <strong>{u.firstName}</strong>
                  <span class="mono">{u.phone || "no number"}</span>
                </button>
              </li>
            ))}
          </ul>
          <NewUser
            onCreated={async (created) => {
              await load();
              setSelected(created.userId);
            }}
          />
        </div>
        {user ? <Device user={user} key={user.userId} /> : <p class="empty">Create a person or pick one.</p>}
      </div>
    </section>
  );
}

function NewUser({ onCreated }) {
  const [name, setName] = useState("");
  const [phone, setPhone] = useState("");
  const [language, setLanguage] = useState("en");
  const [error, setError] = useState(null);
  async function submit(event) {
    event.preventDefault();
    setError(null);
    try {
      const reply = await post("/sandbox/v1/users", {
        user: { firstName: name.trim(), phone: phone.trim(), languageCode: language },
      });
      setName("");
      setPhone("");
      await onCreated(reply.user);
    } catch (err) {
      setError(err);
    }
  }
  return (
    <form onSubmit={submit} aria-labelledby="new-person-title" class="new-person">
      <h3 id="new-person-title">New person</h3>
      <Field id="person-name" label="First name">
        {(attrs) => <input {...attrs} value={name} onInput={(e) => setName(e.currentTarget.value)} />}
      </Field>
      <Field id="person-phone" label="Their phone number" hint="E.164, e.g. +79991234567">
        {(attrs) => <input {...attrs} type="tel" required value={phone} onInput={(e) => setPhone(e.currentTarget.value)} />}
      </Field>
      <Field id="person-language" label="Telegram language">
        {(attrs) => (
          <select {...attrs} value={language} onChange={(e) => setLanguage(e.currentTarget.value)}>
            <option value="en">English</option>
            <option value="ru">Русский</option>
          </select>
        )}
      </Field>
      <ErrorBox error={error} />
      <button type="submit">Create person</button>
    </form>
  );
}

function Device({ user }) {
  const [bots, setBots] = useState([]);
  const [bot, setBot] = useState("");
  const [tab, setTab] = useState("telegram");
  const [codes, setCodes] = useState(false);
  const [online, setOnline] = useState(true);
  const [unread, setUnread] = useState(0);
  const [error, setError] = useState(null);
  const codesBase = `/sandbox/v1/users/${user.userId}/verificationCodes`;
  useEffect(() => {
    get("/v1/bots", { pageSize: 100 }).then((r) => setBots(r.bots || []), setError);
  }, []);
  usePoll(
    async () => {
      if (codes) return;
      const reply = await get(codesBase);
      setUnread((reply.messages || []).filter((m) => m.status === "delivered").length);
    },
    2000,
    [codesBase, codes],
  );
  async function toggleOnline() {
    setError(null);
    try {
      await post(`/sandbox/v1/users/${user.userId}:setDeviceOnline`, { online: !online });
      setOnline(!online);
    } catch (err) {
      setError(err);
    }
  }
  return (
    <div class="device" aria-label={`${user.firstName}'s phone`} role="region">
      <div class="device-bar">
        <span>{user.firstName}</span>
        <span class="mono">{user.phone}</span>
        <button type="button" class="quiet" onClick={toggleOnline} aria-pressed={!online}>
          {online ? "Go offline" : "Go online"}
        </button>
      </div>
      <div class="device-tabs" role="tablist">
        <button type="button" role="tab" aria-selected={tab === "telegram"} onClick={() => setTab("telegram")}>
          Telegram
        </button>
        <button type="button" role="tab" aria-selected={tab === "sms"} onClick={() => setTab("sms")}>
          SMS
        </button>
      </div>
      <ErrorBox error={error} />
      {tab === "sms" ? (
        <SmsInbox phone={user.phone} />
      ) : codes ? (
        <VerificationCodes base={codesBase} onBack={() => setCodes(false)} />
      ) : bot ? (
        <Chat user={user} bot={bots.find((b) => b.id === bot)} onBack={() => setBot("")} key={bot} />
      ) : (
        <ul class="chat-list" aria-label="Chats">
          <li>
            <button type="button" onClick={() => setCodes(true)}>
              <strong>Verification Codes</strong>
              <span class="muted">
                {online ? "" : "offline: nothing arrives · "}
                {unread ? `${unread} unread` : "codes from Telegram's Gateway"}
              </span>
            </button>
          </li>
          {bots.map((b) => (
            <li key={b.id}>
              <button type="button" onClick={() => setBot(b.id)}>
                <strong>@{b.username}</strong>
                <span class="muted">{b.shared ? "otpgate shared bot" : "your bot"}</span>
              </button>
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}

function Chat({ user, bot, onBack }) {
  const base = `/sandbox/v1/users/${user.userId}/bots/${encodeURIComponent(bot.id)}`;
  const [messages, setMessages] = useState([]);
  const [text, setText] = useState("");
  const [foreign, setForeign] = useState("");
  const [error, setError] = useState(null);
  const [blocked, setBlocked] = useState(blockedSet().has(`${user.userId}/${bot.id}`));
  const last = useRef(0);
  const end = useRef(null);

  function merge(incoming) {
    if (!incoming.length) return;
    setMessages((known) => {
      const byId = new Map(known.map((m) => [m.messageId, m]));
      for (const m of incoming) byId.set(m.messageId, m);
      return [...byId.values()].sort((a, b) => Number(a.messageId) - Number(b.messageId));
    });
    last.current = Math.max(last.current, ...incoming.map((m) => Number(m.messageId)));
  }

  async function refresh(full = false) {
    // Deletions change old messages: a full read every so often shows them gone.
    const reply = await get(`${base}/messages`, { afterMessageId: full ? 0 : last.current });
    if (full) {
      setMessages(reply.messages || []);
      last.current = Math.max(0, ...(reply.messages || []).map((m) => Number(m.messageId)));
    } else merge(reply.messages || []);
  }

  const ticks = useRef(0);
  usePoll(() => refresh(ticks.current++ % 8 === 0), 1500, [base]);
  useEffect(() => end.current?.scrollIntoView({ block: "end" }), [messages.length]);

  async function act(path, body = {}) {
    setError(null);
    try {
      const reply = await post(`${base}:${path}`, body);
      await refresh();
      return reply;
    } catch (err) {
      setError(err);
      return null;
    }
  }

  async function toggleBlock() {
    const next = !blocked;
    if ((await act("setBlocked", { blocked: next })) !== null) {
      const set = blockedSet();
      next ? set.add(`${user.userId}/${bot.id}`) : set.delete(`${user.userId}/${bot.id}`);
      sessionStorage.setItem(BLOCKED, JSON.stringify([...set]));
      setBlocked(next);
    }
  }

  const shown = messages.filter((m) => !m.deleted);
  const lastBot = [...shown].reverse().find((m) => m.fromBot);
  const askContact = lastBot?.requestContact;
  return (
    <div class="chat">
      <div class="chat-head">
        <button type="button" class="quiet" onClick={onBack} aria-label="Back to chats">
          ←
        </button>
        <strong>@{bot.username}</strong>
        <button type="button" class="quiet" onClick={toggleBlock}>
          {blocked ? "Unblock bot" : "Block bot"}
        </button>
      </div>
      <ol class="bubbles" aria-live="polite" aria-label="Messages">
        {shown.map((m) => (
          <li key={m.messageId} class={m.fromBot ? "bubble bot" : "bubble me"}>
            <p>{m.text}</p>
            <small>
              {m.protectContent && <span class="protected" title="Forwarding and saving are off">protected · </span>}
              <time datetime={m.sendTime}>{when(m.sendTime)}</time>
            </small>
          </li>
        ))}
        <li ref={end} class="sr-only" aria-hidden="true" />
      </ol>
      {shown.length === 0 && !blocked && (
        <button type="button" class="start" onClick={() => act("start")}>
          Start
        </button>
      )}
      {askContact && !blocked && (
        <button type="button" class="keyboard" onClick={() => act("shareContact")}>
          📱 Share my phone number
        </button>
      )}
      <ErrorBox error={error} />
      <form
        class="composer"
        onSubmit={async (e) => {
          e.preventDefault();
          if (text.trim() && (await act("sendText", { text })) !== null) setText("");
        }}
      >
        <label for="composer-text" class="sr-only">
          Message to @{bot.username}
        </label>
        <input
          id="composer-text"
          placeholder={blocked ? "You blocked this bot" : "Message"}
          disabled={blocked}
          value={text}
          onInput={(e) => setText(e.currentTarget.value)}
        />
        <button type="submit" disabled={blocked || !text.trim()}>
          Send
        </button>
      </form>
      <details class="more">
        <summary>Share someone else's contact</summary>
        <form
          onSubmit={async (e) => {
            e.preventDefault();
            if ((await act("shareContact", { phone: foreign.trim() })) !== null) setForeign("");
          }}
        >
          <Field id="foreign-phone" label="Their number">
            {(attrs) => (
              <input {...attrs} type="tel" required value={foreign} onInput={(e) => setForeign(e.currentTarget.value)} />
            )}
          </Field>
          <button type="submit">Share contact</button>
        </form>
      </details>
    </div>
  );
}

function VerificationCodes({ base, onBack }) {
  // Open means read: every poll while this chat is on screen reads what has arrived.
  const [messages, setMessages] = useState([]);
  const [error, setError] = useState(null);
  usePoll(
    async () => {
      try {
        const reply = await post(`${base}:open`, {});
        setMessages(reply.messages || []);
        setError(null);
      } catch (err) {
        setError(err);
      }
    },
    1500,
    [base],
  );
  return (
    <div class="chat">
      <div class="chat-head">
        <button type="button" class="quiet" onClick={onBack} aria-label="Back to chats">
          ←
        </button>
        <strong>Verification Codes</strong>
        <span class="muted">Telegram</span>
      </div>
      <ErrorBox error={error} />
      {messages.length === 0 && <p class="empty">No codes yet.</p>}
      <ol class="bubbles" aria-live="polite" aria-label="Verification codes">
        {messages.map((m) => (
          <li key={m.messageId} class="bubble bot">
            <p>{m.text}</p>
            <small>
              {m.status} · <time datetime={m.sendTime}>{when(m.sendTime)}</time>
            </small>
          </li>
        ))}
      </ol>
    </div>
  );
}

function SmsInbox({ phone }) {
  const [messages, setMessages] = useState([]);
  const [error, setError] = useState(null);
  usePoll(
    async () => {
      try {
        const reply = await get("/sandbox/v1/sms", { phone, pageSize: 50 });
        setMessages(reply.messages || []);
        setError(null);
      } catch (err) {
        setError(err);
      }
    },
    2000,
    [phone],
  );
  return (
    <div class="sms">
      <ErrorBox error={error} />
      {messages.length === 0 && <p class="empty">No SMS to {phone} yet.</p>}
      <ol class="bubbles" aria-live="polite" aria-label="SMS">
        {[...messages].reverse().map((m) => (
          <li key={m.id} class="bubble bot">
            <p>{m.text}</p>
            <small>
              {m.sender} · <time datetime={m.createTime}>{when(m.createTime)}</time>
            </small>
          </li>
        ))}
      </ol>
    </div>
  );
}
