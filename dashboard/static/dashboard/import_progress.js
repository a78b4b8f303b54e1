// An import running in a worker: show its progress every second, reload when it has finished.
(function () {
  "use strict";
  const box = document.getElementById("import-progress");
  if (!box) return;
  const bar = box.querySelector("progress");
  const processed = box.querySelector(".js-processed");

  function poll() {
    fetch(box.dataset.progressUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((response) => (response.ok ? response.json() : null))
      .then((data) => {
        if (data && data.finished) {
          window.location.reload();
          return;
        }
        if (data) {
          bar.max = data.rows_total;
          bar.value = data.rows_processed;
          processed.textContent = data.rows_processed.toLocaleString();
        }
        window.setTimeout(poll, 1000);
      })
      .catch(() => window.setTimeout(poll, 1000));
  }

  window.setTimeout(poll, 1000);
})();
