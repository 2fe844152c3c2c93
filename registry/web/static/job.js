// Live job progress: follows /ui/jobs/<id>/events (server-sent events) and updates
// the progress bar, status and log tail; reloads once the job ends, so the
// server-rendered page shows the result or error. Reading works without it.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root || !window.EventSource) { return; }
  var terminal = (root.getAttribute("data-terminal") || "").split(" ");
  if (terminal.indexOf(root.getAttribute("data-status")) !== -1) { return; }
  var bar = document.getElementById("job-progress");
  var percent = document.getElementById("job-percent");
  var status = document.getElementById("job-status");
  var message = document.getElementById("job-message");
  var log = document.getElementById("job-log");
  var source = new EventSource(root.getAttribute("data-events"));
  source.onmessage = function (event) {
    var data = JSON.parse(event.data);
    var value = Math.max(0, Math.min(1, Number(data.progress) || 0));
    bar.value = value;
    bar.setAttribute("value", String(value));
    bar.textContent = percent.textContent = Math.round(value * 100) + "%";
    status.textContent = data.status;
    root.setAttribute("data-status", data.status);
    message.textContent = data.message || "";
    data.logs.forEach(function (line) {
      log.appendChild(document.createTextNode("[" + line.level + "] " + line.line + "\n"));
    });
    log.scrollTop = log.scrollHeight;
    if (terminal.indexOf(data.status) !== -1) {
      source.close();
      window.location.reload();
    }
  };
  source.addEventListener("end", function () { source.close(); });
})();
