// dial.js: the /mock/ form (dial.html) places a test call with POST /v1/calls
// and opens the ringing page of its hint. A file of its own, not inline: the
// mock pages' Content-Security-Policy runs no inline script.
document.getElementById("f").addEventListener("submit", async (e) => {
  e.preventDefault();
  const go = document.getElementById("go"), err = document.getElementById("error");
  go.disabled = true; err.textContent = "";
  try {
    const headers = { "Content-Type": "application/json" };
    const token = document.getElementById("token").value.trim();
    if (token) headers.Authorization = "Bearer " + token;
    const res = await fetch("/v1/calls", {
      method: "POST",
      headers,
      body: JSON.stringify({
        to: "+15555550100",
        prompt: document.getElementById("prompt").value,
        calleeName: document.getElementById("callee").value || undefined,
        callerName: document.getElementById("caller").value || undefined,
      }),
    });
    const body = await res.json();
    if (!res.ok) throw new Error((body.error && body.error.message) || res.statusText);
    if (!body.hint) throw new Error("This server does not use the mock phone.");
    location.href = body.hint;
  } catch (x) {
    err.textContent = "Could not place the call: " + x.message;
    go.disabled = false;
  }
});
