// The rule builder: add and remove condition rows, and show the new-feature fields only when
// "+ Create a new feature…" is chosen. Without JavaScript the same buttons submit the form and
// the server answers with a row more or less (dashboard/views/rules.py, _edit_rows).
(function () {
  "use strict";
  const form = document.getElementById("rule-form");
  if (!form) return;
  const rows = form.querySelector(".condition-rows");
  const template = document.getElementById("condition-template");
  const total = form.querySelector("input[name=conditions-TOTAL_FORMS]");
  const addButton = form.querySelector(".js-add-condition");
  const max = parseInt(rows.dataset.max, 10);

  // Django's formset names rows conditions-0-…, conditions-1-…: keep them consecutive.
  function renumber() {
    const all = rows.querySelectorAll(".condition-row");
    all.forEach((row, index) => {
      row.querySelectorAll("input, select, label, button").forEach((element) => {
        for (const attribute of ["name", "id", "for"]) {
          const value = element.getAttribute(attribute);
          if (value) element.setAttribute(attribute, value.replace(/conditions-(\d+|__prefix__)-/, `conditions-${index}-`));
        }
        if (element.classList.contains("js-remove-condition")) element.value = String(index);
      });
    });
    total.value = String(all.length);
    addButton.hidden = all.length >= max;
    const none = rows.querySelector(".js-no-conditions");
    if (none) none.hidden = all.length > 0;
  }

  addButton.addEventListener("click", (event) => {
    event.preventDefault();
    rows.appendChild(template.content.cloneNode(true));
    renumber();
    const all = rows.querySelectorAll(".condition-row");
    all[all.length - 1].querySelector("input").focus();
  });

  rows.addEventListener("click", (event) => {
    const button = event.target.closest(".js-remove-condition");
    if (!button) return;
    event.preventDefault();
    button.closest(".condition-row").remove();
    renumber();
  });

  const select = form.querySelector("select[name=feature]");
  const newFeature = document.getElementById("new-feature");
  const newKey = newFeature.querySelector("input[name=new_feature_key]");
  if (select.value === "" && newKey.value) select.value = "__new__";
  function showNewFeature() {
    newFeature.hidden = select.value !== "__new__";
  }
  select.addEventListener("change", () => {
    showNewFeature();
    if (!newFeature.hidden) newKey.focus();
  });
  showNewFeature();
  renumber();

  // Preview: what the rule would map if saved now (dashboard/views/rules.py, rule_preview).
  // Needs JavaScript, so the button is shown only here.
  const previewButton = document.getElementById("preview-rule");
  const panel = document.getElementById("rule-preview");
  if (previewButton && panel) {
    previewButton.hidden = false;
    const error = panel.querySelector(".js-preview-error");
    const figures = panel.querySelector(".js-preview-figures");
    const show = (selector, text) => { panel.querySelector(selector).textContent = text; };
    previewButton.addEventListener("click", async () => {
      previewButton.disabled = true;
      panel.hidden = false;
      try {
        const response = await fetch(previewButton.dataset.url, {
          method: "POST",
          body: new FormData(form),
          credentials: "same-origin",
          headers: { "X-Requested-With": "fetch" },
        });
        const body = await response.json();
        if (!response.ok) {
          error.textContent = (body.errors || ["The preview failed."]).join(" ");
          error.hidden = false;
          figures.hidden = true;
          return;
        }
        error.hidden = true;
        figures.hidden = false;
        show(".js-preview-matched", String(body.matched_events));
        show(".js-preview-amount", body.amount_total);
        show(".js-preview-users", String(body.users_affected));
        show(".js-preview-periods", body.by_period.map((p) => `${p.start.slice(0, 7)}: ${p.matched} (${p.amount})`).join(", ") || "—");
        show(".js-preview-sample", body.sample.join(", ") || "—");
      } catch (exc) {
        error.textContent = "The preview failed: " + exc;
        error.hidden = false;
        figures.hidden = true;
      } finally {
        previewButton.disabled = false;
      }
    });
  }
})();
