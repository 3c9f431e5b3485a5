// Drag and drop onto the file picker, and a live ingest counter. No build step, nothing from the internet.
(function () {
  const drop = document.getElementById("drop");
  const file = document.getElementById("file");
  const text = document.getElementById("drop-text");
  const form = document.getElementById("search-form");
  if (drop && file && form) {
    const show = () => { if (file.files.length) text.textContent = file.files[0].name; };
    file.addEventListener("change", show);
    ["dragenter", "dragover"].forEach((t) => document.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => document.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
    document.addEventListener("drop", (e) => {
      if (e.dataTransfer && e.dataTransfer.files.length) { file.files = e.dataTransfer.files; show(); form.submit(); }
    });
  }
  const status = document.getElementById("status");
  if (status && status.dataset.running === "true") {
    const tick = async () => {
      try {
        const r = await fetch("/api/health");
        const h = await r.json();
        const i = h.images;
        status.textContent = `${i.indexed} images indexed` + (i.pending ? ` · indexing: ${i.pending} to go` : "") + (i.failed ? ` · ${i.failed} failed` : "");
        if (i.pending) setTimeout(tick, 1500);
      } catch (_) { setTimeout(tick, 5000); }
    };
    setTimeout(tick, 1500);
  }
})();
