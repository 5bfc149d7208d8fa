// The search page: calls the gateway's JSON API (/api/v1/...) and draws each hit's word-region matches.
"use strict";

const COLORS = ["#d1242f", "#1a7f37", "#0969da", "#8250df", "#bf8700", "#bc4c00", "#1b7c83", "#cf222e"];
const SHOWN_BOXES = 3; // boxes drawn before hovering: the words that matched best
const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("teran-token") || ""; }
function authHeaders() { return token() ? { Authorization: "Bearer " + token() } : {}; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// fetch an API path; resolves to the JSON body, or throws an Error with the API's message
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  } catch (err) {
    throw new Error("The search page's server cannot be reached (" + err.message + "). Is python -m webui running?");
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (response.status === 401) $("token-box").hidden = false;
  if (!response.ok) {
    const error = body && body.error ? body.error : { code: "HTTP " + response.status, message: response.statusText };
    throw new Error(error.code + ": " + error.message);
  }
  return body;
}

// an <img> for a photo URL; with a token the photo is fetched with it (an <img src> cannot send headers)
function photoElement(url, alt) {
  const img = document.createElement("img");
  img.alt = alt;
  if (!token()) {
    img.src = url;
  } else {
    fetch(url, { headers: authHeaders() })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
      .then((blob) => { img.src = URL.createObjectURL(blob); })
      .catch(() => { img.alt = alt + " (photo not available)"; });
  }
  return img;
}

function boxElement(match, color, strong) {
  const [x1, y1, x2, y2] = match.box;
  const box = document.createElement("div");
  box.className = "box" + (strong ? "" : " weak");
  box.style.setProperty("--c", color);
  box.style.left = 100 * x1 + "%";
  box.style.top = 100 * y1 + "%";
  box.style.width = 100 * (x2 - x1) + "%";
  box.style.height = 100 * (y2 - y1) + "%";
  box.dataset.word = match.word;
  const label = document.createElement("span");
  label.textContent = match.word;
  box.append(label);
  return box;
}

// word chips under a hit; hovering one lights its box in `frame` (the hit's photo or the query photo)
function wordChips(words, frame) {
  const chips = document.createElement("div");
  chips.className = "words";
  const order = words.map((w, i) => i).sort((a, b) => words[b].similarity - words[a].similarity);
  const strong = new Set(order.slice(0, SHOWN_BOXES));
  words.forEach((match, i) => {
    const color = COLORS[i % COLORS.length];
    const chip = document.createElement("span");
    chip.className = "word";
    chip.style.setProperty("--c", color);
    chip.textContent = match.word;
    chip.title = "region " + match.region + ", similarity " + match.similarity.toFixed(2);
    let box = null;
    const onFrame = frame === null ? null : () => frame();
    if (match.box.length === 4 && onFrame) {
      if (frame.persistent) { box = boxElement(match, color, strong.has(i)); frame().append(box); }
      chip.addEventListener("mouseenter", () => {
        if (!box) { box = boxElement(match, color, false); frame().append(box); }
        box.classList.add("on"); chip.classList.add("on");
      });
      chip.addEventListener("mouseleave", () => {
        box.classList.remove("on"); chip.classList.remove("on");
        if (!frame.persistent) { box.remove(); box = null; }
      });
    }
    chips.append(chip);
  });
  return chips;
}

function hitMeta(hit, place, result) {
  const meta = document.createElement("div");
  meta.className = "meta";
  let text = "#" + place + "  score " + hit.score.toFixed(3);
  if (result.reranked) text += "  (first stage #" + (hit.first_stage_rank + 1) + ")";
  meta.textContent = text;
  meta.title = hit.id;
  return meta;
}

function imageHit(hit, place, result) {
  const card = document.createElement("article");
  card.className = "hit image-hit";
  card.dataset.id = hit.id;
  const photo = document.createElement("div");
  photo.className = "photo";
  if (hit.photo_url) photo.append(photoElement(hit.photo_url, hit.id));
  else photo.textContent = hit.id + " (photo not served: start the gateway with --images-dir)";
  card.append(photo, hitMeta(hit, place, result));
  if (hit.text) {
    const text = document.createElement("div");
    text.className = "text muted";
    text.textContent = hit.text;
    card.append(text);
  }
  const frame = () => photo;
  frame.persistent = true;
  card.append(wordChips(hit.words, frame));
  return card;
}

function captionHit(hit, place, result) {
  const card = document.createElement("article");
  card.className = "hit caption-hit";
  card.dataset.id = hit.id;
  if (hit.photo_url) {
    const thumb = photoElement(hit.photo_url, "the photo of " + hit.id);
    thumb.className = "thumb";
    card.append(thumb);
  }
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = hit.text || hit.id;
  const frame = () => $("query-img").parentElement;
  frame.persistent = false;
  card.append(text, hitMeta(hit, place, result), wordChips(hit.words, frame));
  return card;
}

function render(result) {
  const results = $("results");
  results.replaceChildren();
  const what = result.target === "image" ? "photos" : "captions";
  $("summary").textContent =
    result.hits.length + " " + what + " of " + result.candidates + " first-stage candidates" +
    (result.reranked ? ", re-ranked by " + result.ranking : "") + " in " + Math.round(result.took_ms) + " ms";
  if (result.hits.length === 0) {
    $("summary").textContent += ": no " + what + " are indexed that pass the filter";
  }
  result.hits.forEach((hit, i) => results.append((result.target === "image" ? imageHit : captionHit)(hit, i + 1, result)));
}

function options() {
  return {
    top_k: parseInt($("top-k").value, 10) || 12,
    filter: $("filter").value.trim(),
    rerank: $("rerank").checked,
  };
}

async function run(button, request) {
  showError("");
  button.disabled = true;
  document.body.dataset.state = "searching";
  try {
    render(await request());
    document.body.dataset.state = "done";
  } catch (err) {
    $("results").replaceChildren();
    $("summary").textContent = "";
    showError(err.message);
    document.body.dataset.state = "error";
  } finally {
    button.disabled = false;
  }
}

// A photo query's photo, shown beside the results (a column of its own on wide screens: style.css).
function showQueryPhoto(shown) {
  $("query-photo").hidden = !shown;
  $("answer").classList.toggle("photo-query", shown);
}

$("caption-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showQueryPhoto(false);
  run($("caption-search"), () => api("/api/v1/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text: $("caption").value, ...options() }),
  }));
});

$("photo-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = $("photo").files[0];
  if (!file) { showError("Choose a photo first (JPEG, PNG or WebP)."); return; }
  const query = $("query-img");
  query.parentElement.querySelectorAll(".box").forEach((b) => b.remove());
  query.src = URL.createObjectURL(file);
  showQueryPhoto(true);
  const o = options();
  const params = new URLSearchParams({ top_k: o.top_k, filter: o.filter, rerank: o.rerank });
  run($("photo-search"), () => api("/api/v1/search/image?" + params, {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream" },
    body: file,
  }));
});

$("token-save").addEventListener("click", () => {
  sessionStorage.setItem("teran-token", $("token").value.trim());
  $("token-box").hidden = true;
  showError("");
  loadStats();
});

async function loadStats() {
  try {
    const stats = await api("/api/v1/stats");
    let text = stats.images + " photos and " + stats.captions + " captions indexed";
    if (stats.model) text += " · model " + stats.model;
    if (stats.images === 0 && stats.captions === 0) text += " · nothing is indexed yet: teran index --images DIR --captions FILE";
    $("stats").textContent = text;
    if (stats.limits && stats.limits.max_top_k) $("top-k").max = stats.limits.max_top_k;
  } catch (err) {
    $("stats").textContent = "";
    showError(err.message);
  }
}

loadStats();
