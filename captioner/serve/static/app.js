// The captioner page: no build step, no library. Each picture goes to POST /predict as its own request
// (the server batches requests that arrive together) and gets a card with its caption, the beams kept by
// the search, and for models that attend, one button per word that lights up the regions it looked at.
"use strict";

const drop = document.getElementById("drop");
const input = document.getElementById("files");
const results = document.getElementById("results");
const template = document.getElementById("card");
const key = document.getElementById("key");

// The server says what it accepts; when it needs an API key, the page asks for one and sends it.
fetch("/info").then((response) => response.json()).then((info) => {
  document.getElementById("key-row").hidden = !info.api_key_required;
}).catch(() => {});

input.addEventListener("change", () => { caption(input.files); input.value = ""; });
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (event) => caption(event.dataTransfer.files));

function caption(files) {
  for (const file of files) {
    const card = template.content.firstElementChild.cloneNode(true);
    const image = card.querySelector("img");
    image.src = URL.createObjectURL(file);
    image.alt = file.name;
    results.prepend(card);
    const form = new FormData();
    form.append("image", file);
    form.append("num_return", "3");
    form.append("attention", "true");
    const headers = key.value ? { "X-API-Key": key.value } : {};
    fetch("/predict", { method: "POST", body: form, headers })
      .then(async (response) => {
        const body = await response.json().catch(() => ({ detail: response.statusText }));
        if (!response.ok) throw new Error(body.detail || response.statusText);
        show(card, body);
      })
      .catch((error) => {
        const status = card.querySelector(".status");
        status.textContent = `${file.name}: ${error.message}`;
        status.classList.add("error");
      });
  }
}

function show(card, body) {
  card.querySelector(".status").remove();
  card.querySelector(".caption").textContent = body.caption;
  card.querySelector(".score").textContent = `log-probability ${body.score.toFixed(2)}`;
  const beams = card.querySelector(".beams");
  card.querySelector(".beams-title").hidden = !(body.alternatives && body.alternatives.length);
  for (const beam of body.alternatives || []) {
    const item = document.createElement("li");
    item.textContent = beam.caption;
    const score = document.createElement("span");
    score.textContent = beam.score.toFixed(2);
    item.append(score);
    beams.append(item);
  }
  const time = body.time_ms;
  card.querySelector(".timing").textContent =
    `${time.total.toFixed(0)} ms (model ${time.model.toFixed(0)} ms for a batch of ${time.batch_size})`;
  if (body.attention) showWords(card, body.attention);
}

function showWords(card, attention) {
  const words = card.querySelector(".words");
  const canvas = card.querySelector("canvas");
  const image = card.querySelector("img");
  words.hidden = false;
  attention.words.forEach((word, index) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = word;
    button.addEventListener("click", () => {
      const on = !button.classList.contains("on");
      words.querySelectorAll("button").forEach((other) => other.classList.remove("on"));
      if (on) { button.classList.add("on"); paint(canvas, image, attention.grid, attention.weights[index]); }
      else { canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height); }
    });
    words.append(button);
  });
}

// Darken the picture except where the word looked: the weights of the grid of regions, scaled to their maximum,
// drawn as a small image and stretched (smoothly) over the picture.
function paint(canvas, image, grid, weights) {
  const [rows, columns] = grid;
  canvas.width = image.clientWidth;
  canvas.height = image.clientHeight;
  const cells = document.createElement("canvas");
  cells.width = columns;
  cells.height = rows;
  const context = cells.getContext("2d");
  const pixels = context.createImageData(columns, rows);
  const top = Math.max(...weights, 1e-8);
  weights.forEach((weight, cell) => {
    pixels.data[4 * cell + 3] = Math.round(200 * (1 - weight / top));
  });
  context.putImageData(pixels, 0, 0);
  const target = canvas.getContext("2d");
  target.clearRect(0, 0, canvas.width, canvas.height);
  target.imageSmoothingEnabled = true;
  target.drawImage(cells, 0, 0, canvas.width, canvas.height);
}
