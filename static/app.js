// The search form: drop an image anywhere, paste an image or a URL, preview, progress; a live ingest counter.
// No build step, nothing loaded from the internet.
(function () {
  "use strict";
  const form = document.getElementById("search-form");
  const file = document.getElementById("file");
  const url = document.getElementById("url");
  const preview = document.getElementById("preview");
  const previewImg = document.getElementById("preview-img");
  const previewName = document.getElementById("preview-name");
  const dropText = document.getElementById("drop-text");
  const overlay = document.getElementById("drop-overlay");
  const progress = document.getElementById("progress");
  const button = document.getElementById("search-button");
  const KEY = "pictrace-query-preview";

  function showPreview(f) {
    if (!preview || !f) return;
    const reader = new FileReader();
    reader.onload = () => {
      previewImg.src = reader.result;
      previewName.textContent = f.name || "pasted image";
      preview.hidden = false;
      try { sessionStorage.setItem(KEY, reader.result.length < 3000000 ? reader.result : ""); } catch (_) { /* full */ }
    };
    reader.readAsDataURL(f);
    if (dropText) dropText.textContent = "Change the image";
  }

  function useFile(f, submit) {
    if (!form || !f || !f.type.startsWith("image/")) return false;
    const dt = new DataTransfer();
    dt.items.add(f);
    file.files = dt.files;
    url.value = "";
    showPreview(f);
    if (submit) start();
    return true;
  }

  function start() {
    if (progress) progress.hidden = false;
    if (button) button.disabled = true;
    form.setAttribute("aria-busy", "true");
    form.submit();
  }

  if (form) {
    file.addEventListener("change", () => { if (file.files.length) { url.value = ""; showPreview(file.files[0]); } });
    url.addEventListener("input", () => {
      if (url.value && file.files.length) { file.value = ""; preview.hidden = true; }
      try { sessionStorage.removeItem(KEY); } catch (_) { /* ignore */ }
    });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (!file.files.length && !url.value.trim()) { url.focus(); return; }
      if (!file.files.length) { try { sessionStorage.removeItem(KEY); } catch (_) { /* ignore */ } }
      start();
    });
    let depth = 0;
    document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; overlay.hidden = false; });
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; overlay.hidden = true; } });
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      overlay.hidden = true;
      const dt = e.dataTransfer;
      if (!dt) return;
      if (dt.files.length && useFile(dt.files[0], true)) return;
      const text = dt.getData("text/uri-list") || dt.getData("text/plain");
      if (text && /^https?:\/\//i.test(text.trim())) { url.value = text.trim().split("\n")[0]; start(); }
    });
    document.addEventListener("paste", (e) => {
      const items = e.clipboardData ? Array.from(e.clipboardData.items) : [];
      const image = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
      if (image) { e.preventDefault(); useFile(image.getAsFile(), true); return; }
      if (document.activeElement === url) return; // a normal paste into the URL field
      const text = e.clipboardData && e.clipboardData.getData("text/plain");
      if (text && /^https?:\/\/\S+$/i.test(text.trim())) { e.preventDefault(); url.value = text.trim(); url.focus(); }
    });
  }

  // On the results page: show the query the user picked (kept in this tab only, never sent anywhere).
  const queryPreview = document.getElementById("query-preview");
  if (queryPreview) {
    let data = "";
    try { data = sessionStorage.getItem(KEY) || ""; } catch (_) { /* ignore */ }
    if (data.startsWith("data:image/")) { queryPreview.src = data; queryPreview.hidden = false; }
  }

  const status = document.getElementById("status");
  if (status && status.dataset.running === "true") {
    const tick = async () => {
      try {
        const h = await (await fetch("/api/health")).json();
        const i = h.images;
        status.textContent = `${i.indexed} images indexed` + (i.pending ? ` · indexing: ${i.pending} to go` : "") + (i.failed ? ` · ${i.failed} failed` : "");
        if (i.pending) setTimeout(tick, 1500);
      } catch (_) { setTimeout(tick, 5000); }
    };
    setTimeout(tick, 1500);
  }
})();

// The duplicates page: j/k between groups, arrows between pages, and decisions through the token-protected API.
(function () {
  "use strict";
  const groups = Array.from(document.querySelectorAll(".dup-group"));
  if (!document.getElementById("dup-total")) return;
  const TOKEN = "pictrace-api-token";
  const token = document.getElementById("token");
  const error = document.getElementById("decide-error");
  const showDecide = () => {
    document.querySelectorAll(".decide").forEach((el) => { el.hidden = !token.value; });
  };
  try { token.value = sessionStorage.getItem(TOKEN) || ""; } catch (_) { /* ignore */ }
  if (token.value) token.closest("details").open = true;
  showDecide();
  token.addEventListener("input", () => {
    try { sessionStorage.setItem(TOKEN, token.value); } catch (_) { /* ignore */ }
    showDecide();
  });
  async function decide(path, body) {
    error.hidden = true;
    const r = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token.value}` },
      body: JSON.stringify(body),
    });
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail; } catch (_) { /* not JSON */ }
      error.textContent = `Not done: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
      error.hidden = false;
      return;
    }
    window.location.reload();
  }
  document.addEventListener("click", (e) => {
    const keep = e.target.closest(".keep-btn");
    if (keep) {
      const others = keep.closest(".dup-group").querySelectorAll(".dup-member").length - 1;
      const remove = window.confirm(`Keep this one. Also delete the ${others} others from the gallery?`);
      decide("/api/duplicates/keep", { sha256: keep.dataset.sha, delete_others: remove });
    }
    const split = e.target.closest(".split-btn");
    if (split) decide("/api/duplicates/not-duplicates", { sha256_a: split.dataset.sha, sha256_b: split.dataset.keeper });
  });
  document.addEventListener("keydown", (e) => {
    const tag = (document.activeElement && document.activeElement.tagName) || "";
    if (["INPUT", "SELECT", "TEXTAREA"].includes(tag) || e.altKey || e.ctrlKey || e.metaKey) return;
    const current = groups.findIndex((g) => g.contains(document.activeElement));
    if (e.key === "j" || e.key === "k") {
      const next = e.key === "j" ? Math.min(current + 1, groups.length - 1) : Math.max(current - 1, 0);
      if (groups[next]) { groups[next].focus(); groups[next].scrollIntoView({ block: "nearest" }); }
    } else if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      const link = document.getElementById(e.key === "ArrowRight" ? "next-page" : "prev-page");
      if (link) window.location.href = link.href;
    }
  });
})();
