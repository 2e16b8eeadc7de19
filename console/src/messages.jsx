// Messages: the list (status and time filters, pages) and one message with its timeline.
import { useEffect, useState } from "preact/hooks";
import { get, post } from "./api.js";
import { ErrorBox, Field, Pager, Status, Timeline, shortName, usePaged, when } from "./ui.jsx";

const STATUSES = ["QUEUED", "HELD", "SENT", "DELIVERED", "FAILED", "EXPIRED", "CANCELED"];

function dayStart(value) {
  return value ? new Date(`${value}T00:00:00`).toISOString() : "";
}

function dayAfter(value) {
  if (!value) return "";
  const date = new Date(`${value}T00:00:00`);
  date.setDate(date.getDate() + 1);
  return date.toISOString();
}

export function Messages({ id }) {
  return id ? <MessageDetail id={id} /> : <MessageList />;
}

function MessageList() {
  const [status, setStatus] = useState("");
  const [from, setFrom] = useState("");
  const [until, setUntil] = useState("");
  const paged = usePaged(
    async (token) => {
      const reply = await get("/v1/messages", {
        pageSize: 20,
        pageToken: token,
        status: status && `MESSAGE_STATUS_${status}`,
        createTimeAfter: dayStart(from),
        createTimeBefore: dayAfter(until),
      });
      return { items: reply.messages || [], next: reply.nextPageToken };
    },
    [status, from, until],
  );
  return (
    <section>
      <h1>Messages</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <Field id="message-status" label="Status">
          {(attrs) => (
            <select {...attrs} value={status} onChange={(e) => setStatus(e.currentTarget.value)}>
              <option value="">Any</option>
              {STATUSES.map((s) => (
                <option value={s} key={s}>
                  {s.toLowerCase()}
                </option>
              ))}
            </select>
          )}
        </Field>
        <Field id="message-from" label="Sent from">
          {(attrs) => <input {...attrs} type="date" value={from} onChange={(e) => setFrom(e.currentTarget.value)} />}
        </Field>
        <Field id="message-until" label="Until">
          {(attrs) => <input {...attrs} type="date" value={until} onChange={(e) => setUntil(e.currentTarget.value)} />}
        </Field>
      </form>
      <ErrorBox error={paged.error} />
      {paged.items.length === 0 && !paged.busy && !paged.error && (
        <p class="empty">No messages yet. Send one from “Send a test”.</p>
      )}
      <ul class="rows" aria-busy={paged.busy}>
        {paged.items.map((m) => (
          <li key={m.id}>
            <a href={`#/messages/${m.id}`} class="row">
              <span class="mono">{m.phoneMasked}</span>
              <Status value={m.status} prefix="MESSAGE_STATUS_" />
              <span class="muted">{shortName(m.channel || m.requestedChannel, "CHANNEL_")}</span>
              <time datetime={m.createTime}>{when(m.createTime)}</time>
            </a>
          </li>
        ))}
      </ul>
      <Pager paged={paged} noun="Message" />
    </section>
  );
}

export function messageEvents(m) {
  const final = {
    FAILED: `Failed: ${shortName(m.failureReason, "FAILURE_REASON_")}`,
    EXPIRED: `Expired${m.failureReason ? `: ${shortName(m.failureReason, "FAILURE_REASON_")}` : ""}`,
    CANCELED: "Canceled",
    HELD: "Held until the person re-confirms the number",
  }[m.status.replace("MESSAGE_STATUS_", "")];
  const channel = shortName(m.channel, "CHANNEL_");
  return [
    { at: m.createTime, label: "Accepted", tone: "wait" },
    { at: m.sentTime, label: `Sent by ${channel}${m.botId ? ` (@${m.botId})` : ""}`, tone: "ok" },
    { at: m.deliveredTime, label: "Delivered", tone: "ok" },
    { at: m.readTime, label: "Read", tone: "ok" },
    final ? { at: m.updateTime, label: final, tone: m.status.endsWith("HELD") ? "wait" : "bad" } : {},
  ];
}

function MessageDetail({ id }) {
  const [message, setMessage] = useState(null);
  const [error, setError] = useState(null);
  const load = () => get(`/v1/messages/${encodeURIComponent(id)}`).then((r) => setMessage(r.message), setError);
  useEffect(() => {
    load();
  }, [id]);
  async function cancel() {
    try {
      setMessage((await post(`/v1/messages/${encodeURIComponent(id)}:cancel`)).message);
    } catch (err) {
      setError(err);
    }
  }
  return (
    <section>
      <p>
        <a href="#/messages">← All messages</a>
      </p>
      <h1>Message</h1>
      <ErrorBox error={error} />
      {message && (
        <>
          <dl class="facts">
            <dt>Id</dt>
            <dd class="mono">{message.id}</dd>
            <dt>To</dt>
            <dd class="mono">{message.phoneMasked}</dd>
            <dt>Status</dt>
            <dd>
              <Status value={message.status} prefix="MESSAGE_STATUS_" />
            </dd>
            <dt>Attempts</dt>
            <dd>{message.attempts}</dd>
            {message.requestId && (
              <>
                <dt>Request id</dt>
                <dd class="mono">{message.requestId}</dd>
              </>
            )}
            {message.protectContent && (
              <>
                <dt>Protected</dt>
                <dd>no forwarding or saving in Telegram</dd>
              </>
            )}
          </dl>
          <h2>Timeline</h2>
          <Timeline events={messageEvents(message)} />
          <div class="actions">
            <button type="button" class="quiet" onClick={load}>
              Refresh
            </button>
            {["MESSAGE_STATUS_QUEUED", "MESSAGE_STATUS_HELD"].includes(message.status) && (
              <button type="button" class="danger" onClick={cancel}>
                Cancel message
              </button>
            )}
          </div>
        </>
      )}
    </section>
  );
}
