// bayesncl_jax feature explorer: table sorting and class filter.
// Plain JavaScript, no libraries; works from file://.
(function () {
  "use strict";

  // A cell's sort key: data-v (a number when it parses), else its text.
  // Missing values (data-v="") sort last in both directions.
  function key(row, col) {
    var cell = row.cells[col];
    var v = cell.getAttribute("data-v");
    if (v === null) { return cell.textContent.trim().toLowerCase(); }
    if (v === "") { return null; }
    var f = Number(v);
    return isNaN(f) ? v.toLowerCase() : f;
  }

  function sortBy(table, col, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    rows.sort(function (a, b) {
      var x = key(a, col), y = key(b, col);
      if (x === null || y === null) {
        return (x === null) - (y === null);
      }
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return ascending ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  Array.prototype.forEach.call(
    document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells,
        function (th, col) {
          if (th.classList.contains("nosort")) { return; }
          th.tabIndex = 0;
          th.title = "sort by this column";
          th.addEventListener("click", function () { sortBy(table, col, th); });
          th.addEventListener("keydown", function (e) {
            if (e.key === "Enter") { sortBy(table, col, th); }
          });
        });
    });

  // <select data-filter="TABLE_ID">: keep the rows whose data-cls matches.
  Array.prototype.forEach.call(
    document.querySelectorAll("select[data-filter]"), function (select) {
      var table = document.getElementById(select.getAttribute("data-filter"));
      var counter = document.getElementById(select.getAttribute("data-count"));
      function apply() {
        var shown = 0, rows = table.tBodies[0].rows;
        Array.prototype.forEach.call(rows, function (r) {
          var keep = select.value === "" ||
            r.getAttribute("data-cls") === select.value;
          r.hidden = !keep;
          shown += keep ? 1 : 0;
        });
        if (counter) { counter.textContent = shown + " of " + rows.length; }
      }
      select.addEventListener("change", apply);
      apply();
    });
}());
