// facedb console: the one script. Uploads with face boxes (enrol, check a photo), the camera, the live decisions
// table, and confirmations. Every page also works without it (plain forms); nothing here is fetched from
// anywhere but this server. Text from the server is always set with textContent, never parsed as HTML.
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const page = document.body.dataset.page || "";

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.entries(props || {}).forEach(([k, v]) => {
      if (k === "text") node.textContent = v;
      else if (k === "className") node.className = v;
      else node.setAttribute(k, v);
    });
    (children || []).forEach((c) => c && node.appendChild(c));
    return node;
  }

  async function call(url, options) {
    const response = await fetch(url, Object.assign({credentials: "same-origin"}, options || {},
      {headers: Object.assign({"X-CSRF-Token": csrf}, (options || {}).headers || {})}));
    if (response.redirected && response.url.includes("/console/login")) {
      window.location.href = response.url;  // the key was revoked meanwhile: sign in again
      throw new Error("signed out");
    }
    let body = null;
    try { body = await response.json(); } catch (e) { body = {message: response.statusText}; }
    return {ok: response.ok, status: response.status, body: body};
  }

  function fmt(x) { return typeof x === "number" ? x.toFixed(4) : ""; }

  // Boxes are placed in percent of the photo's own pixel size, so they stay on the faces at any display size.
  function drawBoxes(frame, img, faces, label) {
    frame.querySelectorAll(".box").forEach((b) => b.remove());
    const w = img.naturalWidth, h = img.naturalHeight;
    if (!w || !h) return;
    faces.forEach((face, i) => {
      const [x1, y1, x2, y2] = face.box;
      const info = label(face, i);
      const box = el("div", {className: "box " + (info.kind || ""), "aria-hidden": "true"},
        [info.text ? el("span", {text: info.text}) : null]);
      box.style.left = (100 * x1 / w) + "%";
      box.style.top = (100 * y1 / h) + "%";
      box.style.width = (100 * (x2 - x1) / w) + "%";
      box.style.height = (100 * (y2 - y1) / h) + "%";
      frame.appendChild(box);
    });
  }

  function whenLoaded(img) {
    return img.complete && img.naturalWidth ? Promise.resolve() :
      new Promise((resolve) => { img.onload = () => resolve(); img.onerror = () => resolve(); });
  }

  function dropZone(zone, onFiles) {
    if (!zone) return;
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
      e.preventDefault(); zone.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (e) => { e.preventDefault(); onFiles(Array.from(e.dataTransfer.files || [])); });
  }

  // ------------------------------------------------------------------------------------- confirmations
  document.querySelectorAll("form[data-confirm]").forEach((form) => form.addEventListener("submit", (e) => {
    if (!window.confirm(form.dataset.confirm)) e.preventDefault();
  }));
  document.querySelectorAll("form[data-confirm-name]").forEach((form) => {
    const input = form.querySelector("input[name=confirm]");
    const button = form.querySelector("button[type=submit]");
    const check = () => { button.disabled = input.value.trim().normalize("NFC") !== form.dataset.confirmName.normalize("NFC"); };
    input.addEventListener("input", check);
    check();
  });
  const secret = document.getElementById("new-secret");
  if (secret) { secret.focus(); secret.select(); }

  // ---------------------------------------------------------------------------------------------- enrol
  if (page === "enrol") {
    const form = document.getElementById("enrol-form");
    const input = document.getElementById("photos");
    const list = document.getElementById("shots");
    const summary = document.getElementById("enrol-summary");
    const shots = [];
    const names = new Set();

    function uniqueName(name) {
      let candidate = name || "photo.jpg", n = 2;
      while (names.has(candidate)) candidate = name.replace(/(\.[^.]*)?$/, " (" + (n++) + ")$1");
      names.add(candidate);
      return candidate;
    }

    function setStatus(shot, text, kind, extra) {
      shot.status.textContent = "";
      shot.status.appendChild(el("span", {className: kind || "", text: text}));
      (extra || []).forEach((w) => shot.status.appendChild(el("div", {className: "warn", text: "⚠ " + w})));
    }

    async function look(shot) {
      setStatus(shot, "looking for faces…");
      const data = new FormData();
      data.append("photo", shot.file, shot.name);
      const r = await call("/console/api/check", {method: "POST", body: data});
      if (!r.ok) { shot.verdict = "error"; setStatus(shot, r.body.message || "refused", "bad"); return; }
      const c = r.body;
      shot.verdict = c.verdict;
      await whenLoaded(shot.img);
      drawBoxes(shot.frame, shot.img, c.faces, (f, i) => ({
        kind: i === c.chosen ? "" : "other", text: c.faces.length > 1 ? String(i + 1) : ""}));
      const faces = c.faces.length === 1 ? "1 face" : c.faces.length + " faces";
      if (c.verdict === "ok") setStatus(shot, faces + ": ready to save", "ok", c.warnings);
      else setStatus(shot, c.reason || c.verdict, "bad", c.warnings);
    }

    function add(files) {
      // every file is shown: one that is not a photo gets the server's reason, not silence
      files.forEach((file) => {
          const shot = {file: file, name: uniqueName(file.name), saved: false};
          shot.img = el("img", {alt: "photo " + shot.name});
          shot.img.src = URL.createObjectURL(file);
          shot.frame = el("div", {className: "frame"}, [shot.img]);
          shot.status = el("div", {className: "status", role: "status"});
          const drop = el("button", {type: "button", className: "link", text: "Leave out",
                                     "aria-label": "Leave out " + shot.name});
          shot.li = el("li", {className: "shot"}, [shot.frame, el("div", {className: "name", text: shot.name}),
                                                   shot.status, drop]);
          drop.addEventListener("click", () => { shot.li.remove(); shots.splice(shots.indexOf(shot), 1); });
          shot.drop = drop;
          list.appendChild(shot.li);
          shots.push(shot);
          look(shot);
        });
    }

    input.addEventListener("change", () => { add(Array.from(input.files)); input.value = ""; });
    input.removeAttribute("required");
    dropZone(document.getElementById("drop"), add);

    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const name = form.elements.name.value.trim();
      if (!name) { form.elements.name.focus(); form.reportValidity(); return; }
      const todo = shots.filter((s) => !s.saved);
      if (!todo.length) { summary.textContent = "Add photos first (drag them in, choose them, or use the camera)."; return; }
      const save = document.getElementById("enrol-save");
      save.disabled = true;
      let stored = 0, refused = 0;
      for (const shot of todo) {
        setStatus(shot, "saving…");
        const data = new FormData();
        data.append("name", name);
        data.append("photos", shot.file, shot.name);
        const r = await call("/console/api/enrol", {method: "POST", body: data});
        const report = r.ok ? r.body : (r.body.report || null);
        const warnings = report ? report.warnings.map((w) => w.reason) : [];
        if (r.ok && report.faces_stored) {
          shot.saved = true; stored++; shot.drop.hidden = true;
          setStatus(shot, "stored as template " + report.template_ids.join(", "), "ok", warnings);
        } else if (report && report.skipped.length) {
          refused++; setStatus(shot, "not stored: " + report.skipped[0].reason, "bad");
        } else {
          refused++; setStatus(shot, "not stored: " + (r.body.message || "refused"), "bad");
        }
      }
      save.disabled = false;
      summary.textContent = "";
      summary.appendChild(document.createTextNode(stored + " stored, " + refused + " not stored. "));
      if (stored) summary.appendChild(el("a", {href: "/console/people/" + encodeURIComponent(name),
                                               text: "See " + name}));
    });

    // The camera (a secure context is needed: https, or this machine's own address).
    const openCam = document.getElementById("camera-open");
    const camera = document.getElementById("camera");
    const video = document.getElementById("camera-view");
    let stream = null, taken = 0;
    if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) openCam.hidden = false;
    openCam.addEventListener("click", async () => {
      try {
        stream = await navigator.mediaDevices.getUserMedia({video: {facingMode: "user"}, audio: false});
      } catch (err) {
        summary.textContent = "The camera could not be opened: " + err.message;
        return;
      }
      video.srcObject = stream;
      camera.hidden = false;
      openCam.hidden = true;
    });
    document.getElementById("camera-take").addEventListener("click", () => {
      const canvas = document.createElement("canvas");
      canvas.width = video.videoWidth || 640;
      canvas.height = video.videoHeight || 480;
      canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
      canvas.toBlob((blob) => {
        if (blob) add([new File([blob], "camera-" + (++taken) + ".jpg", {type: "image/jpeg"})]);
      }, "image/jpeg", 0.92);
    });
    document.getElementById("camera-stop").addEventListener("click", () => {
      if (stream) stream.getTracks().forEach((t) => t.stop());
      camera.hidden = true;
      openCam.hidden = false;
    });
  }

  // -------------------------------------------------------------------------------------- check a photo
  if (page === "identify") {
    const form = document.getElementById("identify-form");
    const input = document.getElementById("probe");
    const frame = document.getElementById("probe-frame");
    const img = document.getElementById("probe-img");
    const answers = document.getElementById("probe-faces");

    async function check(file) {
      answers.textContent = "";
      answers.appendChild(el("li", {text: "checking…"}));
      frame.querySelectorAll(".box").forEach((b) => b.remove());
      img.src = URL.createObjectURL(file);
      frame.hidden = false;
      const data = new FormData();
      data.append("photo", file, file.name || "photo.jpg");
      const r = await call("/console/api/identify", {method: "POST", body: data});
      answers.textContent = "";
      if (!r.ok) { answers.appendChild(el("li", {className: "bad", text: r.body.message || "refused"})); return; }
      const faces = r.body.faces;
      if (!faces.length) answers.appendChild(el("li", {className: "unknown", text: "No face found in this photo."}));
      faces.forEach((f) => answers.appendChild(el("li", {className: f.identity ? "match" : "unknown"}, [
        el("strong", {text: f.identity || "unknown"}),
        // a door key is told the decision and a confidence band only (README "Threat model")
        document.createTextNode("similarity" in f ? " similarity " + fmt(f.similarity) + " (threshold " +
          fmt(f.threshold) + ")" : f.confidence ? " confidence " + f.confidence : "")])));
      await whenLoaded(img);
      drawBoxes(frame, img, faces, (f) => ({kind: f.identity ? "" : "unknown", text: f.identity || "unknown"}));
    }

    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (input.files.length) check(input.files[0]);
      else form.reportValidity();
    });
    input.addEventListener("change", () => { if (input.files.length) check(input.files[0]); });
    dropZone(document.getElementById("probe-drop"), (files) => { if (files.length) check(files[0]); });
  }

  // -------------------------------------------------------------------------------- live decisions table
  if (page === "decisions") {
    const table = document.getElementById("decisions");
    const body = table.tBodies[0];
    const live = document.getElementById("live");
    const announce = document.getElementById("live-status");
    let last = Number(table.dataset.lastId || 0);
    const filters = new URLSearchParams(window.location.search);
    filters.delete("after_id");

    function row(r) {
      const who = el("td", {}, [document.createTextNode(r.key_name || r.actor || "")]);
      if (r.key_name) { who.appendChild(document.createTextNode(" ")); who.appendChild(el("span", {className: "small", text: r.actor})); }
      const decision = el("td", {}, [el("span", {className: "tag " + r.decision, text: r.decision})]);
      if (r.faces === 0) decision.appendChild(el("span", {className: "small", text: " no face"}));
      const face = el("td", {className: "face"});
      if (r.thumbnail) face.appendChild(el("img", {src: "/console/thumbs/probe/" + r.id, alt: "probe face of decision " + r.id,
                                                  width: "40", height: "40"}));
      return el("tr", {className: r.decision + " fresh"}, [el("td", {text: r.when}), who, decision,
        el("td", {text: r.identity || ""}), el("td", {className: "num", text: r.similarity}),
        el("td", {className: "num", text: r.threshold}), face]);
    }

    async function poll() {
      if (!live.checked || document.visibilityState !== "visible") return;
      filters.set("after_id", String(last));
      let r;
      try { r = await call("/console/api/decisions?" + filters.toString()); } catch (e) { return; }
      if (!r.ok || !r.body.records.length) return;
      const none = body.querySelector("tr.none");
      if (none) none.remove();
      r.body.records.slice().reverse().forEach((rec) => body.insertBefore(row(rec), body.firstChild));
      last = Math.max(last, ...r.body.records.map((rec) => rec.id));
      while (body.rows.length > 500) body.deleteRow(-1);
      announce.textContent = r.body.records.length + " new decision(s)";
    }
    window.setInterval(poll, 2500);
  }
})();
