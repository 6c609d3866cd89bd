// Live refresh keeps the user's zoom. A new data version re-renders the open page, and Dash mounts fresh
// graphs for it (so Plotly's uirevision alone cannot carry the zoom over): each graph's axis ranges set by
// the user are kept here, per page URL and graph id, and applied again to the graph that replaces it.
// A double-click (autorange) forgets them; another selection (another URL) starts unzoomed.
(function () {
  var zooms = {};
  var AXIS = /^([xy]axis\d*)\.(range(\[[01]\])?|autorange)$/;

  function keyOf(gd) {
    var host = gd.parentElement;
    var id = host && host.id ? host.id : gd.id;
    return id ? window.location.pathname + window.location.search + "#" + id : null;
  }

  function remember(gd, ev) {
    var key = keyOf(gd);
    if (!key || !ev || gd.__msRestoring) { return; }
    var z = zooms[key] || {};
    Object.keys(ev).forEach(function (k) {
      var m = AXIS.exec(k);
      if (!m) { return; }
      if (m[2] === "autorange") {
        Object.keys(z).forEach(function (old) { if (old.indexOf(m[1] + ".") === 0) { delete z[old]; } });
      } else {
        z[k] = ev[k];
      }
    });
    if (Object.keys(z).length) { zooms[key] = z; } else { delete zooms[key]; }
  }

  function visit() {
    if (!window.Plotly) { return; }
    var plots = document.querySelectorAll(".js-plotly-plot");
    for (var i = 0; i < plots.length; i++) {
      var gd = plots[i];
      if (gd.__msZoomHooked || !gd.on || !gd._fullLayout) { continue; }
      gd.__msZoomHooked = true;
      gd.on("plotly_relayout", remember.bind(null, gd));
      var z = zooms[keyOf(gd)];
      if (z) {
        gd.__msRestoring = true;
        window.Plotly.relayout(gd, z).then(function () { this.__msRestoring = false; }.bind(gd));
      }
    }
  }

  window.setInterval(visit, 250);
})();
