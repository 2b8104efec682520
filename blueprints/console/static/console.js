// The console's entry: sign-in, the pages (hash routes) and sign-out.
//
// Sign-in asks GET /key/info with the key as a Bearer header: the master key gets the operator
// pages, a virtual key its own page. Only then is the key kept, in this tab's sessionStorage.

import {describe, forgetSession, get, onUnauthorized, saveSession, session, whoIs} from "./api.js";
import {destroyCharts} from "./charts.js";
import {announce, h} from "./dom.js";
import * as audit from "./audit.js";
import * as keys from "./keys.js";
import * as logs from "./logs.js";
import * as me from "./me.js";
import * as replicas from "./replicas.js";
import * as usage from "./usage.js";

const PAGES = {
  master: [["keys", keys], ["usage", usage], ["logs", logs], ["replicas", replicas], ["audit", audit]],
  key: [["me", me]],
};

const $ = (id) => document.getElementById(id);
let generation = 0;

function pagesOf(current) {
  return current ? PAGES[current.role] || [] : [];
}

function closeDialogs() {
  for (const dialog of document.querySelectorAll("dialog")) dialog.close();
}

function showSignIn(message) {
  generation += 1;
  closeDialogs();
  destroyCharts();
  $("page").replaceChildren();
  $("page").hidden = true;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("nav-list").replaceChildren();
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  document.title = "Sign in · vLLM gateway console";
  $("signin-key").focus();
}

function signOut(message) {
  forgetSession();
  if (window.location.hash) history.replaceState(null, "", window.location.pathname);
  showSignIn(message);
  if (!message) announce("Signed out.");
}

function showNav(current) {
  $("nav-list").replaceChildren(...pagesOf(current).map(([name, page]) =>
    h("li", null, h("a", {href: `#${name}`, id: `nav-${name}`}, page.title))));
  $("who-text").textContent = current.role === "master" ? "Operator (master key)" : `Key holder: ${current.label || "your key"}`;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("signin").hidden = true;
}

async function route({focus = true} = {}) {
  const current = session();
  if (!current) {
    showSignIn();
    return;
  }
  const pages = pagesOf(current);
  const wanted = window.location.hash.replace(/^#/, "");
  const found = pages.find(([name]) => name === wanted) || pages[0];
  if (!found) {
    signOut("This key has no pages here.");
    return;
  }
  const [name, page] = found;
  if (wanted !== name) history.replaceState(null, "", `#${name}`);
  showNav(current);
  for (const link of document.querySelectorAll("#nav-list a")) {
    if (link.id === `nav-${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  generation += 1;
  const mine = generation;
  if (focus) $("status").textContent = "";
  closeDialogs();
  destroyCharts();
  const heading = h("h1", {tabindex: "-1", id: "page-title"}, page.title);
  const root = $("page");
  root.replaceChildren(heading);
  root.hidden = false;
  delete root.dataset.ready;
  root.dataset.page = name;
  document.title = `${page.title} · vLLM gateway console`;
  if (focus) heading.focus();
  const isCurrent = () => mine === generation && session() !== null;
  const calls = {};
  const fresh = (name) => {  // for a page's reloads: only the answer to the latest call is shown
    calls[name] = (calls[name] || 0) + 1;
    const call = calls[name];
    return () => isCurrent() && calls[name] === call;
  };
  try {
    await page.render(root, {isCurrent, fresh, role: current.role});
  } catch (error) {
    if (mine === generation && session()) root.append(h("p", {class: "error", role: "alert"}, describe(error)));
  }
  if (mine === generation) root.dataset.ready = "true";
}

async function signIn(event) {
  event.preventDefault();
  const field = $("signin-key");
  const button = event.target.querySelector("button[type=submit]");
  const key = field.value.trim();
  $("signin-error").textContent = "";
  if (!key) {
    $("signin-error").textContent = "Enter a key.";
    field.focus();
    return;
  }
  button.disabled = true;
  try {
    const who = await whoIs(key);
    if (!who || (who.role !== "master" && who.role !== "key")) throw new Error("unexpected answer from /key/info");
    const label = who.role === "key" && who.info ? who.info.key_alias || who.info.key_name : null;
    saveSession({key, role: who.role, label});
    field.value = "";
    announce(who.role === "master" ? "Signed in as operator." : "Signed in with your key.", "ok");
    await route();
  } catch (error) {
    forgetSession();
    $("signin-error").textContent = error.status === 401
      ? `Sign-in refused: the gateway does not accept this key (${error.message}).`
      : `Sign-in failed: ${describe(error)}`;
    field.focus();
    field.select();
  } finally {
    button.disabled = false;
  }
}

async function start() {
  onUnauthorized((message) => signOut(message));
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", () => route());
  const current = session();
  if (!current) {
    showSignIn();
    return;
  }
  try {  // a reload: the role may have changed (a key deleted, blocked); ask again
    const who = await get("/key/info");
    saveSession({...current, role: who.role});
  } catch {
    return;  // a 401 has signed out already; anything else: show the sign-in as it is
  }
  await route({focus: false});
}

start();
