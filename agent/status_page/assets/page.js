// The technologist's status page: renders the board the agent sends on /events (server-sent events).
// No framework and no build step; text goes in with textContent only, never as HTML.
"use strict";

const STATE_WORDS = {
  receiving: ["⇣", "receiving images"],
  judging: ["…", "judging"],
  streaming: ["⚙", "computing sCT"],
  published: ["✔", "sCT published"],
  rejected: ["✖", "rejected"],
  incomplete: ["⚠", "incomplete"],
  failed: ["✖", "failed: no sCT"],
  "not inferred": ["ⓘ", "passed, no sCT (model not validated for this protocol)"],
  waiting: ["⏸", "waiting for disk space"],
};
const VERDICT_WORDS = {
  pass: ["✔", "PASS"],
  reject: ["✖", "REJECT"],
  incomplete: ["⚠", "INCOMPLETE"],
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function clock(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function secs(value) {
  return value === null || value === undefined ? "—" : `${value.toFixed(2)} s`;
}

function fact(list, term, value) {
  const row = el("div");
  row.append(el("dt", "", term), el("dd", "", value));
  list.append(row);
}

function renderAgent(agent) {
  const list = document.getElementById("agent");
  list.replaceChildren();
  const engine = agent.engine;
  if (engine) {
    const device = engine.device.startsWith("cuda") ? "GPU" : "CPU";
    fact(list, "engine", `${device} ${engine.backend} ${engine.precision} · ${engine.warm ? "✔ warm" : "warming up"}`);
  } else {
    fact(list, "engine", "starting");
  }
  fact(list, "robots connected", agent.subscribers);
  fact(list, "DICOM", `${agent.dicom_written} written · ${agent.dicom_stored} sent · ${agent.dicom_failed} failed`);
  fact(list, "first image → verdict", secs(agent.first_image_to_verdict_s));
  fact(list, "last image → sCT", secs(agent.last_image_to_volume_s));
  fact(list, "export folder", agent.export_folder_ok ? "✔ watched" : `⚠ ${agent.export_folder_message || "unavailable"}`);
  if (agent.receive) fact(list, "DICOM receive", `✔ ${agent.receive}`);

  const errors = document.getElementById("errors");
  const items = document.getElementById("error-list");
  items.replaceChildren(...agent.errors.map((e) => el("li", "", `${clock(e.at)} ${e.stage}: ${e.message}`)));
  errors.hidden = agent.errors.length === 0;
}

function bar(parent, label, done, total) {
  const width = total ? Math.min(100, (100 * done) / total) : 0;
  const track = el("div", "bar");
  const fill = el("span");
  fill.style.width = `${width}%`;
  track.append(fill);
  track.setAttribute("role", "progressbar");
  track.setAttribute("aria-valuenow", String(done));
  if (total) track.setAttribute("aria-valuemax", String(total));
  parent.append(el("span", "", label), track, el("span", "count", `${done} / ${total ?? "?"}`));
}

// What the sCT's confidence check found: a hatched block with an icon and words where regions are flagged (colour
// is never the only signal), a quiet line otherwise.
const FLAGGED_WORDS = {
  flagged: ["⛔", "sCT NOT TRUSTED IN PART"],
  clear: ["✔", "Confidence checked: no region flagged"],
  unchecked: ["○", "Confidence not checked (the model has none)"],
};

function renderFlagged(flagged) {
  const [icon, words] = FLAGGED_WORDS[flagged.verdict] || ["", flagged.verdict];
  const block = el("div", `flagged is-${flagged.verdict}`);
  block.dataset.flagged = flagged.verdict;
  block.dataset.regions = flagged.regions === null ? "" : String(flagged.regions);
  const head = el("div", "flagged-head");
  head.append(el("span", "flagged-icon", icon), el("span", "flagged-word", words));
  if (flagged.verdict === "flagged" && flagged.volume_ml !== null) {
    head.append(el("span", "flagged-size", ` · ${flagged.regions} region${flagged.regions === 1 ? "" : "s"}, ${flagged.volume_ml.toFixed(1)} mL`));
  }
  block.append(head);
  if (flagged.lines.length) {
    const list = el("ul", "flagged-regions");
    for (const line of flagged.lines) list.append(el("li", "", line));
    block.append(list);
  }
  return block;
}

function renderCard(card, index) {
  const verdict = card.verdict;
  const outcome = verdict ? verdict.outcome : "";
  const classes = ["card", index > 1 ? "older" : "", outcome ? `outcome-${outcome}` : "", card.preview ? "" : "no-preview"];
  const node = el("article", classes.filter(Boolean).join(" "));
  Object.assign(node.dataset, {
    acquisitionId: card.acquisition_id,
    state: card.state,
    outcome,
    final: verdict ? String(verdict.final) : "",
    firstImageAt: String(card.first_image_at),
    outcomeAt: card.outcome_at === null ? "" : String(card.outcome_at),
  });

  const box = el("div", `verdict ${outcome}${verdict && !verdict.final ? " provisional" : ""}`);
  const [icon, word] = VERDICT_WORDS[outcome] || ["…", "CHECKING"];
  box.append(el("div", "icon", icon), el("div", "word", word));
  if (verdict && card.outcome_at && card.first_image_at) {
    const after = Math.max(0, card.outcome_at - card.first_image_at);
    const when = el("div", "when", `${word} ${after.toFixed(2)} s after the first image`);
    when.dataset.verdictAfterFirstImageS = after.toFixed(3);
    box.append(when);
  }
  if (verdict && !verdict.final && verdict.pending.length) {
    box.append(el("div", "when", `waiting for ${verdict.pending.join(", ")}`));
  }

  const body = el("div", "body");
  const series = card.series_number === null ? "Series —" : `Series ${card.series_number}`;
  body.append(el("p", "title", card.series_description ? `${series} · ${card.series_description}` : series));
  const meta = el("p", "meta");
  const [stateIcon, stateWord] = STATE_WORDS[card.state] || ["", card.state];
  const state = el("span", "state", `${stateIcon} ${stateWord}`);
  meta.append(state, ` first image ${clock(card.first_image_at)}`);
  if (verdict) meta.append(` · protocol ${verdict.protocol_id} ${verdict.protocol_version}`);
  body.append(meta);

  const bars = el("div", "bars");
  bar(bars, "images", card.images_received, card.images_expected);
  if (card.slab_count || card.state === "streaming" || card.state === "published") {
    bar(bars, "sCT slabs", card.slabs_done, card.slab_count || null);
  }
  body.append(bars);

  if (verdict && verdict.reasons.length) {
    const list = el("ul", "reasons");
    for (const reason of verdict.reasons) {
      const item = el("li");
      item.dataset.attribute = reason.attribute;
      item.append(el("div", "headline", reason.headline), el("div", "action", reason.action));
      list.append(item);
    }
    body.append(list);
  }
  if (card.note) body.append(el("p", "note", `⚠ ${card.note}`));
  if (card.flagged) body.append(renderFlagged(card.flagged));
  const latency = [];
  if (card.first_image_to_verdict_s !== null) latency.push(`first image → verdict ${secs(card.first_image_to_verdict_s)}`);
  if (card.last_image_to_volume_s !== null) latency.push(`last image → sCT ${secs(card.last_image_to_volume_s)}`);
  if (card.dicom) latency.push(`DICOM ${card.dicom}`);
  if (latency.length) body.append(el("p", "latency", latency.join(" · ")));

  node.append(box, body);
  if (card.preview) {
    const image = el("img", "preview");
    image.src = `/preview/${card.acquisition_id}.png`;
    image.alt = card.flagged && card.flagged.verdict === "flagged"
      ? "Sagittal preview through the region not to trust, outlined and hatched on MR echo 1 and the synthetic CT (not for diagnosis)"
      : "Mid-sagittal preview: MR echo 1 beside the synthetic CT (not for diagnosis)";
    node.append(image);
  }
  return node;
}

// Previews are re-used across renders so that an update does not reload (and flicker) the image.
const previews = new Map();

function render(board) {
  renderAgent(board.agent);
  const main = document.getElementById("acquisitions");
  const cards = board.acquisitions.map((card, index) => {
    const node = renderCard(card, index);
    const old = node.querySelector("img.preview");
    if (old) {
      const kept = previews.get(card.acquisition_id);
      if (kept) old.replaceWith(kept);
      else previews.set(card.acquisition_id, old);
    }
    return node;
  });
  for (const id of previews.keys()) {
    if (!board.acquisitions.some((c) => c.acquisition_id === id)) previews.delete(id);
  }
  main.replaceChildren(...cards);
  if (!cards.length) main.append(el("p", "empty", "Waiting for the first series from the scanner …"));
  const updated = document.getElementById("updated");
  updated.textContent = `Last update ${clock(board.at)}`;
  updated.dataset.version = String(board.version);
}

function connect() {
  const banner = document.getElementById("connection");
  const source = new EventSource("/events");
  source.addEventListener("board", (event) => {
    banner.hidden = true;
    document.body.dataset.connected = "true";
    render(JSON.parse(event.data));
  });
  source.addEventListener("open", () => {
    banner.hidden = true;
  });
  // EventSource reconnects by itself; until it has, say that the page is stale.
  source.addEventListener("error", () => {
    banner.hidden = false;
    document.body.dataset.connected = "false";
  });
}

connect();
