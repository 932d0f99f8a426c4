// fxalign HTML report: sorting, filtering, "failing only", tree and plot navigation.
// Inlined by fxalign/report/html.py. The page is complete without it; this only adds interaction.
// State can come from the address: report.html#filter=mid&failing=1&sort=5&dir=desc
// When it has run, <body data-ready="1">; an error lands in <body data-error="...">.
(function () {
  "use strict";
  var body = document.body;
  function fail(message) {
    body.dataset.error = String(message);
  }
  window.addEventListener("error", function (event) {
    fail(event.message);
  });
  try {
    var table = document.getElementById("rows");
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var filterBox = document.getElementById("filter");
    var failingBox = document.getElementById("failing-only");
    var count = document.getElementById("row-count");
    var state = { filter: "", failing: false, sort: 0, dir: "asc" };

    function readHash() {
      var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
      if (params.has("filter")) state.filter = params.get("filter");
      if (params.has("failing")) state.failing = params.get("failing") === "1";
      if (params.has("sort")) {
        var col = parseInt(params.get("sort"), 10);
        if (col >= 0 && col < headers.length) state.sort = col;
      }
      if (params.get("dir") === "desc") state.dir = "desc";
    }

    function writeHash() {
      var params = new URLSearchParams();
      if (state.filter) params.set("filter", state.filter);
      if (state.failing) params.set("failing", "1");
      if (state.sort !== 0 || state.dir !== "asc") {
        params.set("sort", String(state.sort));
        params.set("dir", state.dir);
      }
      var text = params.toString();
      try {
        history.replaceState(null, "", text ? "#" + text : window.location.pathname);
      } catch (e) {
        // Some browsers refuse history changes on file:// pages; the view still works.
      }
    }

    function key(tr, col) {
      var cell = tr.cells[col];
      if (headers[col].dataset.num === "1") {
        var raw = cell.dataset.v;
        if (raw === "" || raw === undefined) return null;
        return parseFloat(raw); // "Infinity", "-Infinity" and "NaN" parse
      }
      return cell.textContent.toLowerCase();
    }

    function sortRows() {
      var col = state.sort;
      var sign = state.dir === "desc" ? -1 : 1;
      var keyed = rows.map(function (tr) {
        return { tr: tr, k: key(tr, col), i: parseInt(tr.dataset.i, 10) };
      });
      keyed.sort(function (a, b) {
        // missing values last in both directions; NaN is the worst error, so it sorts high
        if (a.k === null || b.k === null) {
          return (a.k === null) - (b.k === null) || a.i - b.i;
        }
        var x = a.k, y = b.k, c;
        if (typeof x === "number") {
          if (isNaN(x) || isNaN(y)) c = isNaN(x) - isNaN(y);
          else c = x < y ? -1 : x > y ? 1 : 0;
        } else {
          c = x < y ? -1 : x > y ? 1 : 0;
        }
        return sign * c || a.i - b.i;
      });
      keyed.forEach(function (item) {
        tbody.appendChild(item.tr);
      });
      headers.forEach(function (th, i) {
        th.classList.toggle("asc", i === col && state.dir === "asc");
        th.classList.toggle("desc", i === col && state.dir === "desc");
      });
    }

    function filterRows() {
      var q = state.filter.trim().toLowerCase();
      var shown = 0;
      rows.forEach(function (tr) {
        var visible =
          (!q || tr.dataset.search.indexOf(q) >= 0) &&
          (!state.failing || tr.dataset.failed === "1");
        tr.hidden = !visible;
        if (visible) shown += 1;
      });
      count.textContent = "showing " + shown + " of " + rows.length + " rows";
    }

    function update(persist) {
      filterBox.value = state.filter;
      failingBox.checked = state.failing;
      sortRows();
      filterRows();
      if (persist) writeHash();
    }

    headers.forEach(function (th, col) {
      th.addEventListener("click", function () {
        if (state.sort === col) {
          state.dir = state.dir === "asc" ? "desc" : "asc";
        } else {
          state.sort = col;
          // errors are most useful worst-first
          state.dir = th.dataset.num === "1" && col !== 0 ? "desc" : "asc";
        }
        update(true);
      });
    });
    filterBox.addEventListener("input", function () {
      state.filter = filterBox.value;
      update(true);
    });
    failingBox.addEventListener("change", function () {
      state.failing = failingBox.checked;
      update(true);
    });

    function showRow(tr) {
      if (tr.hidden) {
        state.filter = "";
        state.failing = false;
        update(true);
      }
      tr.scrollIntoView({ block: "center" });
      tr.classList.remove("flash");
      void tr.offsetWidth; // restart the animation
      tr.classList.add("flash");
    }

    // Plot points link to #row-N; make sure that row is visible.
    Array.prototype.forEach.call(document.querySelectorAll("#plot a[data-row]"), function (a) {
      a.addEventListener("click", function (event) {
        var tr = document.getElementById("row-" + a.dataset.row);
        if (tr) {
          event.preventDefault();
          showRow(tr);
        }
      });
    });

    // Tree: a module name filters the table to that module and everything below it.
    Array.prototype.forEach.call(document.querySelectorAll(".node-name"), function (button) {
      button.addEventListener("click", function (event) {
        event.preventDefault();
        state.filter = button.dataset.path;
        update(true);
        document.getElementById("table-section").scrollIntoView();
      });
    });
    function setOpen(open) {
      Array.prototype.forEach.call(document.querySelectorAll("#module-tree details"), function (d) {
        d.open = open;
      });
    }
    document.getElementById("expand-all").addEventListener("click", function () {
      setOpen(true);
    });
    document.getElementById("collapse-all").addEventListener("click", function () {
      setOpen(false);
    });

    readHash();
    update(false);
    body.dataset.ready = "1";
  } catch (e) {
    fail(e && e.stack ? e.stack : e);
  }
})();
