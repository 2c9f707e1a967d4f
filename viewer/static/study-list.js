// The study list's conveniences; the page works without them.
// - a click anywhere on a row opens its study (unless text is being selected or a link was clicked);
// - keys: "/" focuses the name search, ↑/↓ (or k/j) move between rows, Enter opens, ←/→ change page;
// - the page-size menu applies itself.
(() => {
  "use strict";
  document.documentElement.classList.add("js");
  const rows = Array.from(document.querySelectorAll("table.studies tbody tr.study"));
  let current = -1;

  const linkOf = (row) => row.querySelector("a.open");

  function select(index) {
    if (!rows.length) return;
    current = Math.max(0, Math.min(rows.length - 1, index));
    rows.forEach((row, i) => row.classList.toggle("selected", i === current));
    const link = linkOf(rows[current]);
    if (link) link.focus({ preventScroll: true });
    rows[current].scrollIntoView({ block: "nearest" });
  }

  rows.forEach((row, i) => {
    row.addEventListener("click", (event) => {
      if (event.target.closest("a, button, input, select")) return;
      if (String(window.getSelection() || "").length) return;
      const link = linkOf(row);
      if (!link) return;
      if (event.ctrlKey || event.metaKey || event.button === 1) window.open(link.href, "_blank");
      else window.location.assign(link.href);
    });
    const link = linkOf(row);
    if (link) link.addEventListener("focus", () => {
      current = i;
      rows.forEach((r, j) => r.classList.toggle("selected", j === i));
    });
  });

  function typing(target) {
    return target instanceof HTMLElement &&
      (target.isContentEditable || ["INPUT", "SELECT", "TEXTAREA"].includes(target.tagName));
  }

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || typing(event.target)) return;
    const go = (rel) => {
      const link = document.querySelector(`.pager a[rel="${rel}"]`);
      if (link) window.location.assign(link.href);
    };
    switch (event.key) {
      case "/": {
        const search = document.getElementById("f-name");
        if (search) { event.preventDefault(); search.focus(); search.select(); }
        break;
      }
      case "ArrowDown": case "j": event.preventDefault(); select(current + 1); break;
      case "ArrowUp": case "k": event.preventDefault(); select(current - 1); break;
      case "Enter":
        if (current >= 0 && document.activeElement === document.body) {
          const link = linkOf(rows[current]);
          if (link) window.location.assign(link.href);
        }
        break;
      case "ArrowLeft": go("prev"); break;
      case "ArrowRight": go("next"); break;
      default: break;
    }
  });

  const size = document.getElementById("f-size");
  if (size && size.form) size.addEventListener("change", () => size.form.submit());
})();
