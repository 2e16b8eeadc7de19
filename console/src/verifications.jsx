// Verifications: the list (status, channel, phone filters; pages) and one verification with its
// timeline, where a code can be checked or the verification canceled.
import { useEffect, useState } from "preact/hooks";
import { get, post } from "./api.js";
import { ErrorBox, Field, Notice, Pager, Status, Timeline, shortName, usePaged, when } from "./ui.jsx";

const STATUSES = ["PENDING", "APPROVED", "CANCELED", "EXPIRED", "MAX_ATTEMPTS_REACHED"];

export function verificationFilter({ status, channel, phone }) {
  const terms = [];
  if (status) terms.push(`status = ${status}`);
  if (channel) terms.push(`channel = ${channel}`);
  if (phone.trim()) terms.push(`phone = ${JSON.stringify(phone.trim())}`);
  return terms.join(" AND ");
}

export function Verifications({ id }) {
  return id ? <VerificationDetail id={id} /> : <VerificationList />;
}

function VerificationList() {
  const [status, setStatus] = useState("");
  const [channel, setChannel] = useState("");
  const [phone, setPhone] = useState("");
  const [applied, setApplied] = useState("");
  const paged = usePaged(
    async (token) => {
      const reply = await get("/v1/verifications", { pageSize: 20, pageToken: token, filter: applied });
      return { items: reply.verifications || [], next: reply.nextPageToken };
    },
    [applied],
  );
  useEffect(() => setApplied(verificationFilter({ status, channel, phone })), [status, channel]);
  const filterError = paged.error?.violations?.filter;
  return (
    <section>
      <h1>Verifications</h1>
      <form
        class="filters"
        onSubmit={(e) => {
          e.preventDefault();
          setApplied(verificationFilter({ status, channel, phone }));
        }}
      >
        <Field id="verification-status" label="Status">
          {(attrs) => (
            <select {...attrs} value={status} onChange={(e) => setStatus(e.currentTarget.value)}>
              <option value="">Any</option>
              {STATUSES.map((s) => (
                <option value={s} key={s}>
                  {shortName(s, "")}
                </option>
              ))}
            </select>
          )}
        </Field>
        <Field id="verification-channel" label="Channel">
          {(attrs) => (
            <select {...attrs} value={channel} onChange={(e) => setChannel(e.currentTarget.value)}>
              <option value="">Any</option>
              <option value="TELEGRAM">Telegram</option>
              <option value="SMS">SMS</option>
            </select>
          )}
        </Field>
        <Field id="verification-phone" label="Phone number" error={filterError}>
          {(attrs) => (
            <input
              {...attrs}
              type="tel"
              placeholder="+79991234567"
              value={phone}
              onInput={(e) => setPhone(e.currentTarget.value)}
            />
          )}
        </Field>
        <button type="submit">Filter</button>
      </form>
      {!filterError && <ErrorBox error={paged.error} />}
      {paged.items.length === 0 && !paged.busy && !paged.error && (
        <p class="empty">
          {applied ? "No verification on this page matches." : "No verifications yet. Start one from “Send a test”."}
          {paged.next && " Older ones may: see the next page."}
        </p>
      )}
      <ul class="rows" aria-busy={paged.busy}>
        {paged.items.map((v) => (
          <li key={v.id}>
            <a href={`#/verifications/${v.id}`} class="row">
              <span class="mono">{v.phoneMasked}</span>
              <Status value={v.status} prefix="VERIFICATION_STATUS_" />
              <span class="muted">{shortName(v.channel || v.requestedChannel, "CHANNEL_")}</span>
              <time datetime={v.createTime}>{when(v.createTime)}</time>
            </a>
          </li>
        ))}
      </ul>
      <Pager paged={paged} noun="Verification" />
    </section>
  );
}

export function verificationEvents(v) {
  const status = v.status.replace("VERIFICATION_STATUS_", "");
  const pending = status === "PENDING";
  const sends = Number(v.sendCount || 0);
  return [
    { at: v.createTime, label: `Started; code sent by ${shortName(v.channel, "CHANNEL_")}`, tone: "wait" },
    sends > 1 ? { at: v.updateTime, label: `Sent ${sends} times in all`, tone: "wait" } : {},
    pending
      ? { at: v.expireTime, label: `Expires unless checked (${v.checkAttemptsLeft} tries left)`, tone: "wait" }
      : { at: v.updateTime, label: shortName(status, "").replace(/^./, (c) => c.toUpperCase()), tone: status === "APPROVED" ? "ok" : "bad" },
  ];
}

function VerificationDetail({ id }) {
  const [verification, setVerification] = useState(null);
  const [error, setError] = useState(null);
  const [code, setCode] = useState("");
  const [outcome, setOutcome] = useState("");
  const path = `/v1/verifications/${encodeURIComponent(id)}`;
  const load = () => get(path).then((r) => setVerification(r.verification), setError);
  useEffect(() => {
    load();
  }, [id]);

  async function check(event) {
    event.preventDefault();
    setError(null);
    try {
      const reply = await post(`${path}:check`, { code: code.trim() });
      setVerification(reply.verification);
      setOutcome(
        reply.approved
          ? "Approved: the code is right."
          : reply.verification.status === "VERIFICATION_STATUS_PENDING"
            ? `Wrong code; ${reply.verification.checkAttemptsLeft} tries left.`
            : `Not approved: the verification is ${shortName(reply.verification.status, "VERIFICATION_STATUS_")}.`,
      );
      setCode("");
    } catch (err) {
      setOutcome("");
      setError(err);
    }
  }

  async function cancel() {
    try {
      setVerification((await post(`${path}:cancel`)).verification);
    } catch (err) {
      setError(err);
    }
  }

  const pending = verification?.status === "VERIFICATION_STATUS_PENDING";
  return (
    <section>
      <p>
        <a href="#/verifications">← All verifications</a>
      </p>
      <h1>Verification</h1>
      {verification && (
        <>
          <dl class="facts">
            <dt>Id</dt>
            <dd class="mono">{verification.id}</dd>
            <dt>To</dt>
            <dd class="mono">{verification.phoneMasked}</dd>
            <dt>Status</dt>
            <dd>
              <Status value={verification.status} prefix="VERIFICATION_STATUS_" />
            </dd>
            <dt>Code</dt>
            <dd>
              {verification.codeLength} digits, {verification.locale}
            </dd>
            {verification.messageId && (
              <>
                <dt>Message</dt>
                <dd>
                  <a class="mono" href={`#/messages/${verification.messageId}`}>
                    {verification.messageId}
                  </a>
                </dd>
              </>
            )}
          </dl>
          <h2>Timeline</h2>
          <Timeline events={verificationEvents(verification)} />
          {pending && (
            <form class="inline" onSubmit={check}>
              <Field id="check-code" label="Code the person received" error={error?.violations?.code}>
                {(attrs) => (
                  <input
                    {...attrs}
                    inputmode="numeric"
                    autocomplete="one-time-code"
                    value={code}
                    onInput={(e) => setCode(e.currentTarget.value)}
                    required
                  />
                )}
              </Field>
              <button type="submit">Check code</button>
              <button type="button" class="danger" onClick={cancel}>
                Cancel verification
              </button>
            </form>
          )}
        </>
      )}
      {outcome && <Notice>{outcome}</Notice>}
      {!error?.violations?.code && <ErrorBox error={error} />}
    </section>
  );
}
