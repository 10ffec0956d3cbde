// Sort any table.sortable by clicking (or pressing Enter on) a header; cells carry their raw value in data-v.
(function () {
  "use strict";
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      var type = th.getAttribute("data-type");
      if (!type) { return; }
      th.classList.add("sort");
      th.tabIndex = 0;
      th.title = "Sort by this column";
      function sort() {
        var first = th.getAttribute("data-first") || (type === "num" ? "descending" : "ascending");
        var now = th.getAttribute("aria-sort");
        var next = now ? (now === "ascending" ? "descending" : "ascending") : first;
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", next);
        var dir = next === "ascending" ? 1 : -1;
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute("data-v") || "";
          var y = b.cells[col].getAttribute("data-v") || "";
          if (type === "num") {
            var fx = parseFloat(x), fy = parseFloat(y);
            if (isNaN(fx) && isNaN(fy)) { return 0; }
            if (isNaN(fx)) { return 1; }
            if (isNaN(fy)) { return -1; }
            return dir * (fx - fy);
          }
          return dir * x.localeCompare(y);
        });
        rows.forEach(function (r) { r.classList.remove("group-start"); body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
})();
