// Live reprocessing progress on the rules page: every second, ask the JSON endpoint of each
// rule still queued or running and update its cells; stop when all are finished.
(function () {
  "use strict";
  const rows = Array.from(document.querySelectorAll("[data-progress-url]"));
  const pending = new Set(rows.filter((row) => row.dataset.finished !== "true"));
  if (!pending.size) return;

  const badgeClass = { done: "badge ok", failed: "badge bad", running: "badge", queued: "badge grey" };

  function show(row, data) {
    const status = row.querySelector(".js-status");
    status.textContent = data.status;
    status.className = "js-status " + (badgeClass[data.status] || "badge");
    row.querySelector(".js-scanned").textContent = data.scanned.toLocaleString();
    row.querySelector(".js-mapped").textContent = data.mapped.toLocaleString();
    if (data.finished) {
      row.dataset.finished = "true";
      pending.delete(row);
    }
  }

  function poll() {
    const requests = Array.from(pending).map((row) =>
      fetch(row.dataset.progressUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then((response) => (response.ok ? response.json() : null))
        .then((data) => data && show(row, data))
        .catch(() => null)
    );
    Promise.all(requests).then(() => {
      if (pending.size) window.setTimeout(poll, 1000);
    });
  }

  window.setTimeout(poll, 1000);
})();
