// Usage per UTC day and channel (GetUsage), as a stacked bar chart and the same numbers as a table,
// with what each day cost per channel (Gateway credits as Telegram charged them, SMS per part).
import { useEffect, useState } from "preact/hooks";
import { get } from "./api.js";
import { ErrorBox, Field } from "./ui.jsx";

const SERIES = [
  ["CHANNEL_TELEGRAM", "Telegram", "series-telegram"],
  ["CHANNEL_TELEGRAM_GATEWAY", "Telegram Gateway", "series-gateway"],
  ["CHANNEL_SMS", "SMS", "series-sms"],
  ["CHANNEL_UNSPECIFIED", "Not routed", "series-other"],
];

function day(offset) {
  const date = new Date();
  date.setUTCDate(date.getUTCDate() + offset);
  return date.toISOString().slice(0, 10);
}

export function byDay(records) {
  const days = {};
  for (const r of records) {
    const row = (days[r.day] ||= { day: r.day, billed: 0, cost: {}, refunded: 0 });
    row[r.channel] = (row[r.channel] || 0) + Number(r.messages);
    row.billed += Number(r.billedSms || 0);
    row.cost[r.channel] = (row.cost[r.channel] || 0) + Number(r.cost || 0);
    row.refunded += Number(r.refunded || 0);
  }
  return Object.values(days).sort((a, b) => a.day.localeCompare(b.day));
}

function Chart({ rows }) {
  const width = Math.max(rows.length * 28, 280);
  const height = 160;
  const top = Math.max(1, ...rows.map((r) => SERIES.reduce((sum, [c]) => sum + (r[c] || 0), 0)));
  return (
    <svg class="chart" viewBox={`0 0 ${width} ${height + 24}`} role="img" aria-label="Messages per day by channel">
      {rows.map((r, i) => {
        let y = height;
        return (
          <g key={r.day}>
            {SERIES.map(([channel, , css]) => {
              const h = ((r[channel] || 0) / top) * (height - 8);
              y -= h;
              return h > 0 ? <rect class={css} x={i * 28 + 4} y={y} width={20} height={h} key={channel} /> : null;
            })}
            <text x={i * 28 + 14} y={height + 16} text-anchor="middle">
              {r.day.slice(8)}
            </text>
          </g>
        );
      })}
    </svg>
  );
}

export function Usage() {
  const [start, setStart] = useState(day(-13));
  const [end, setEnd] = useState(day(0));
  const [rows, setRows] = useState([]);
  const [error, setError] = useState(null);
  useEffect(() => {
    get("/v1/usage", { startDay: start, endDay: end }).then(
      (reply) => {
        setRows(byDay(reply.records || []));
        setError(null);
      },
      setError,
    );
  }, [start, end]);
  const bad = error?.violations || {};
  return (
    <section>
      <h1>Usage</h1>
      <p class="muted">Messages per UTC day and the channel that carried them; billed SMS, Gateway refunds and cost per channel in the table.</p>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <Field id="usage-start" label="From (UTC day)" error={bad.start_day}>
          {(attrs) => <input {...attrs} type="date" value={start} onChange={(e) => setStart(e.currentTarget.value)} />}
        </Field>
        <Field id="usage-end" label="Until (UTC day)" error={bad.end_day}>
          {(attrs) => <input {...attrs} type="date" value={end} onChange={(e) => setEnd(e.currentTarget.value)} />}
        </Field>
      </form>
      {!Object.keys(bad).length && <ErrorBox error={error} />}
      {rows.length === 0 && !error ? (
        <p class="empty">Nothing sent in these days.</p>
      ) : (
        <>
          <ul class="legend">
            {SERIES.slice(0, 3).map(([, label, css]) => (
              <li key={css}>
                <span class={`swatch ${css}`} /> {label}
              </li>
            ))}
          </ul>
          <Chart rows={rows} />
          <table>
            <caption class="sr-only">Messages per day and channel</caption>
            <thead>
              <tr>
                <th scope="col">Day</th>
                <th scope="col">Telegram</th>
                <th scope="col">Telegram Gateway</th>
                <th scope="col">SMS</th>
                <th scope="col">Billed SMS</th>
                <th scope="col">Refunded</th>
                <th scope="col">Cost: Gateway</th>
                <th scope="col">Cost: SMS</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((r) => (
                <tr key={r.day}>
                  <th scope="row">{r.day}</th>
                  <td>{r.CHANNEL_TELEGRAM || 0}</td>
                  <td>{r.CHANNEL_TELEGRAM_GATEWAY || 0}</td>
                  <td>{r.CHANNEL_SMS || 0}</td>
                  <td>{r.billed}</td>
                  <td>{r.refunded}</td>
                  <td>{(r.cost.CHANNEL_TELEGRAM_GATEWAY || 0).toFixed(4)}</td>
                  <td>{(r.cost.CHANNEL_SMS || 0).toFixed(4)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
    </section>
  );
}
