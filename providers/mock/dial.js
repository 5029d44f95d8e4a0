// dial.js: the /mock/ form (dial.html) places a test call with POST /v1/calls
// and opens the ringing page of its hint (on this page's origin). A file of
// its own, not inline: the mock pages' Content-Security-Policy runs no inline
// script.
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
    // The hint's page on this page's own origin: the hint names callagent's
    // own address, which a browser reaching it through a forwarded port
    // (ssh -L 9000:127.0.0.1:4545) cannot use.
    const hint = new URL(body.hint, location.href);
    location.href = hint.pathname + hint.search;
  } catch (x) {
    err.textContent = "Could not place the call: " + x.message;
    go.disabled = false;
  }
});
