// The review page's behaviour: keyboard shortcuts, the decision forms, and sending a decision to the JSON API.
// Every text shown is set with textContent (never innerHTML): what the server sends is model output.
// The API key (when the server has keys) lives in this tab's sessionStorage and goes in the Authorization header of
// each decision; the page's cookie only lets the browser view pages, never decide.
(function () {
  'use strict';
  var KEY = 'cai-review-key', NAME = 'cai-review-name', FLASH = 'cai-review-flash';
  var body = document.body;
  var item = document.getElementById('item');
  var busy = false;

  function $(id) { return document.getElementById(id); }

  function toast(text, bad) {
    var t = $('toast');
    t.textContent = text;
    t.className = bad ? 'show bad' : 'show';
    clearTimeout(toast.timer);
    toast.timer = setTimeout(function () { t.className = ''; }, bad ? 6000 : 2000);
  }

  function go(url) { if (url) { window.location.assign(url); } }

  function typing(ev) {
    var t = ev.target;
    return t && (t.tagName === 'TEXTAREA' || t.tagName === 'INPUT' || t.tagName === 'SELECT' || t.isContentEditable);
  }

  // A dialog that asks for one value; resolves to it, or null when cancelled.
  function ask(dialogId, inputId) {
    return new Promise(function (resolve) {
      var d = $(dialogId), input = $(inputId);
      input.value = '';
      d.returnValue = '';
      d.addEventListener('close', function once() {
        d.removeEventListener('close', once);
        var v = input.value.trim();
        resolve(d.returnValue === 'ok' && v ? v : null);
      });
      d.showModal();
      input.focus();
    });
  }

  async function identity(payload, headers) {
    if (body.dataset.keys === '1') {
      var key = sessionStorage.getItem(KEY) || await ask('key-dialog', 'key-input');
      if (!key) { return false; }
      sessionStorage.setItem(KEY, key);
      headers.Authorization = 'Bearer ' + key;
    } else {
      var name = localStorage.getItem(NAME) || await ask('name-dialog', 'name-input');
      if (!name) { return false; }
      localStorage.setItem(NAME, name);
      payload.reviewer = name;
      showName();
    }
    return true;
  }

  function showName() {
    var name = localStorage.getItem(NAME);
    if (body.dataset.keys !== '1' && name) { $('who').textContent = 'reviewing as ' + name; }
  }

  async function decide(decision, extra) {
    if (!item || busy) { return; }
    var payload = Object.assign({decision: decision, content_sha256: item.dataset.sha}, extra || {});
    var headers = {'Content-Type': 'application/json'};
    if (!await identity(payload, headers)) { return; }
    busy = true;
    try {
      var r = await fetch(item.dataset.decide, {method: 'POST', headers: headers, body: JSON.stringify(payload)});
      var data = await r.json().catch(function () { return {}; });
      if (r.status === 401) {
        sessionStorage.removeItem(KEY);
        toast('The API key was refused: try again with another.', true);
        return;
      }
      if (!r.ok) {
        toast((data.error && data.error.message) || ('error ' + r.status), true);
        return;
      }
      sessionStorage.setItem(FLASH, 'Saved: ' + decision + ' (' + item.dataset.id + ')');
      go(item.dataset.next || item.dataset.queue);
    } catch (e) {
      toast('Not saved: ' + e, true);
    } finally {
      busy = false;
    }
  }

  function open(formId, focusId) {
    ['reject-form', 'edit-form'].forEach(function (id) { if ($(id)) { $(id).hidden = id !== formId; } });
    var f = $(formId);
    if (!f) { return; }
    var input = $(focusId);
    input.focus();
    if (input.setSelectionRange) { input.setSelectionRange(input.value.length, input.value.length); }
  }

  function closeForms() {
    ['reject-form', 'edit-form'].forEach(function (id) { if ($(id)) { $(id).hidden = true; } });
    if (document.activeElement) { document.activeElement.blur(); }
  }

  function submitReject() {
    var reason = $('reason').value.trim();
    if (!reason) { toast('A reject needs a reason.', true); return; }
    decide('reject', {reason: reason});
  }

  function submitEdit() {
    var text = $('edit-text').value;
    if (!text.trim()) { toast('An edit needs the edited text.', true); return; }
    var reason = $('edit-reason').value.trim();
    decide('edit', reason ? {text: text, reason: reason} : {text: text});
  }

  var actions = {
    accept: function () { decide('accept'); },
    flip: function () { decide('flip'); },
    tie: function () { decide('tie'); },
    reject: function () { open('reject-form', 'reason'); },
    edit: function () { open('edit-form', 'edit-text'); },
    cancel: closeForms,
    help: function () { $('help').showModal(); }
  };

  document.addEventListener('click', function (ev) {
    var b = ev.target.closest('[data-action]');
    if (b && actions[b.dataset.action] && !b.disabled) { ev.preventDefault(); actions[b.dataset.action](); }
  });
  if ($('reject-form')) {
    $('reject-form').addEventListener('submit', function (ev) { ev.preventDefault(); submitReject(); });
  }
  if ($('edit-form')) {
    $('edit-form').addEventListener('submit', function (ev) { ev.preventDefault(); submitEdit(); });
  }

  // -- the queue: a moving selection ------------------------------------------------------------------------------
  var rows = Array.prototype.slice.call(document.querySelectorAll('table.queue tbody tr[data-href]'));
  var sel = rows.length ? 0 : -1;
  function select(n) {
    if (!rows.length) { return; }
    sel = Math.max(0, Math.min(rows.length - 1, n));
    rows.forEach(function (r, i) { r.classList.toggle('sel', i === sel); });
    rows[sel].scrollIntoView({block: 'nearest'});
  }
  if (rows.length) { select(0); }

  function onItemKey(k, ev) {
    var kind = item.dataset.kind;
    if (k === 'j') { go(item.dataset.next); } else if (k === 'k') { go(item.dataset.prev); } else if (k === 'u') {
      go(item.dataset.queue);
    } else if (k === 'a' && !$('accept').disabled) { actions.accept(); } else if (k === 'r') {
      ev.preventDefault(); actions.reject();
    } else if (k === 'e' && kind === 'record') { ev.preventDefault(); actions.edit(); } else if (k === 'f' &&
        kind === 'preference' && !$('flip').disabled) { actions.flip(); } else if (k === 't' && kind === 'preference') {
      actions.tie();
    }
  }

  function onQueueKey(k, ev) {
    if (k === 'j') { select(sel + 1); } else if (k === 'k') { select(sel - 1); } else if ((k === 'Enter' || k === 'o') &&
        sel >= 0) { go(rows[sel].dataset.href); } else if (k === '/' && $('search')) {
      ev.preventDefault(); $('search').focus();
    } else if (k === 'n' && $('next-page')) { go($('next-page').href); } else if (k === 'p' && $('prev-page')) {
      go($('prev-page').href);
    }
  }

  document.addEventListener('keydown', function (ev) {
    if (ev.defaultPrevented || ev.altKey || document.querySelector('dialog[open]')) { return; }
    var k = ev.key;
    if (typing(ev)) {
      if (k === 'Escape') { ev.preventDefault(); closeForms(); return; }
      if (ev.target.id === 'reason' && k === 'Enter' && !ev.shiftKey) { ev.preventDefault(); submitReject(); return; }
      if ((ev.target.id === 'edit-text' || ev.target.id === 'edit-reason') && k === 'Enter' &&
          (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submitEdit(); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey) { return; }
    if (k === '?') { actions.help(); return; }
    if (item) { onItemKey(k, ev); } else { onQueueKey(k, ev); }
  });

  showName();
  var flash = sessionStorage.getItem(FLASH);
  if (flash) { sessionStorage.removeItem(FLASH); toast(flash); }
  body.dataset.ready = '1';
}());
