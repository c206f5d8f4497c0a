(function () {
  // Image grid: filter by status, sort by a score (cards carry data-* attributes; no data in script).
  var grid = document.getElementById("grid");
  if (!grid) return;
  var cards = Array.prototype.slice.call(grid.children);
  var shown = "all";
  function apply() {
    var sel = document.getElementById("sort");
    var key = sel ? sel.value : "order";
    var desc = key.charAt(0) === "-";
    var name = desc ? key.slice(1) : key;
    cards.sort(function (a, b) {
      var va = parseFloat(a.getAttribute("data-" + name));
      var vb = parseFloat(b.getAttribute("data-" + name));
      var na = isNaN(va), nb = isNaN(vb);
      if (na && nb) return a.getAttribute("data-order") - b.getAttribute("data-order");
      if (na) return 1;
      if (nb) return -1;
      return desc ? vb - va : va - vb;
    });
    cards.forEach(function (c) {
      c.style.display = shown === "all" || c.getAttribute("data-status") === shown ? "" : "none";
      grid.appendChild(c);
    });
  }
  var buttons = document.querySelectorAll("[data-filter]");
  Array.prototype.forEach.call(buttons, function (b) {
    b.addEventListener("click", function () {
      shown = b.getAttribute("data-filter");
      Array.prototype.forEach.call(buttons, function (o) { o.classList.toggle("on", o === b); });
      apply();
    });
  });
  var sort = document.getElementById("sort");
  if (sort) sort.addEventListener("change", apply);
})();
