// Live progress without a build step: while <main data-refresh="N"> is present, fetch this
// page again every N seconds and swap in the new <main>. Parsed with DOMParser, so nothing in
// the fetched HTML runs; the server stops setting data-refresh once every job has finished.
(function () {
  "use strict";
  function schedule() {
    var main = document.querySelector("main[data-refresh]");
    if (!main) return;
    var seconds = parseFloat(main.getAttribute("data-refresh")) || 3;
    window.setTimeout(refresh, seconds * 1000);
  }
  function refresh() {
    var active = document.activeElement;
    // Don't swap the page under someone who is typing in a form or has the tab hidden.
    if (document.hidden || (active && active.closest && active.closest("main form"))) { schedule(); return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html) {
          var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
          var current = document.querySelector("main");
          if (fresh && current) current.replaceWith(document.importNode(fresh, true));
        }
        schedule();
      })
      .catch(schedule);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", schedule);
  else schedule();
})();
