// The cp-stub console's only script: live updates and sending without leaving the page.
// Every page works without it (reading, and sending through ordinary form posts).
//
// Live updates: the server pushes server-sent events (GET /events) when an agent or a command
// changes; the page then fetches itself again and swaps in the regions marked data-live.
// The HTML is rendered by the server in one place, never here.
"use strict";
(() => {
  const announce = document.getElementById("announce");
  const say = (text) => {
    if (announce) announce.textContent = text;
  };

  let running = false;
  let again = false;
  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      do {
        again = false;
        const response = await fetch(window.location.href, {
          credentials: "same-origin",
          headers: { Accept: "text/html" },
          cache: "no-store",
        });
        if (!response.ok) return;
        const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
        for (const region of document.querySelectorAll("[data-live][id]")) {
          const next = fresh.getElementById(region.id);
          if (next === null || next.innerHTML === region.innerHTML) continue;
          const focused = document.activeElement;
          const focusId = focused && region.contains(focused) ? focused.id : "";
          region.innerHTML = next.innerHTML;
          if (focusId) document.getElementById(focusId)?.focus();
        }
      } while (again);
    } catch (error) {
      // The stub is restarting or gone: the event stream reconnects and refreshes again.
    } finally {
      running = false;
    }
  }

  const eventsUrl = document.body.dataset.events;
  if (eventsUrl && "EventSource" in window) {
    const events = new EventSource(eventsUrl);
    events.addEventListener("open", refresh);
    events.addEventListener("tick", refresh);
    events.addEventListener("agent", (event) => {
      const agent = JSON.parse(event.data);
      say(`${agent.agent_id} is ${agent.connected ? "connected" : "offline"}`);
      refresh();
    });
    events.addEventListener("command", (event) => {
      const command = JSON.parse(event.data);
      const state = command.state === "sent" ? "delivered" : command.state.replace("_", " ");
      say(`${command.type} ${command.ref.slice(0, 8)}: ${state}`);
      refresh();
    });
  }

  for (const form of document.querySelectorAll("form[data-send]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      const problem = form.querySelector(".form-error");
      const show = (text) => {
        if (problem === null) return;
        problem.textContent = text;
        problem.hidden = !text;
      };
      if (button) button.disabled = true;
      try {
        const response = await fetch(form.action, {
          method: "POST",
          credentials: "same-origin",
          headers: { Accept: "application/json" },
          body: new URLSearchParams(new FormData(form)),
        });
        const answer = await response.json();
        if (response.ok) {
          show("");
          say(`queued ${answer.command.type} ${answer.command.ref.slice(0, 8)}`);
          form.dataset.sent = answer.command.ref;
        } else {
          show(`Not sent: ${answer.message}`);
        }
        refresh();
      } catch (error) {
        show("Not sent: the stub did not answer.");
      } finally {
        if (button) button.disabled = false;
      }
    });
  }
})();
