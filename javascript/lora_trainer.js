// Train LoRA: follow a run through the WebUI's progress API and send the result to txt2img.
// Everything here is scoped to the tab's elements (ids start with "lora_trainer_").

function lora_trainer_refresh() {
    var refresh = gradioApp().getElementById("lora_trainer_refresh");
    if (refresh) refresh.click();  // a hidden button: Gradio updates the status, gallery and charts
}

function lora_trainer_show_interrupt(shown) {
    // the WebUI's Esc shortcut clicks the current tab's "*_interrupt" button when its style says it is shown
    var cancel = gradioApp().getElementById("lora_trainer_interrupt");
    if (cancel) cancel.style.display = shown ? "block" : "";
}

function lora_trainer_start() {
    var id = randomId();
    var lastRefresh = 0;
    lora_trainer_show_interrupt(true);
    requestProgress(
        id,
        gradioApp().getElementById("lora_trainer_status"),
        gradioApp().getElementById("lora_trainer_gallery"),
        function() {
            lora_trainer_show_interrupt(false);
            lora_trainer_refresh();
            lora_trainer_refresh_lora_lists();
        },
        function(progress) {
            var now = Date.now();
            if (now - lastRefresh > 3000) {
                lastRefresh = now;
                lora_trainer_refresh();
            }
        }
    );
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

function lora_trainer_refresh_lora_lists() {
    ["txt2img", "img2img"].forEach(function(tab) {
        var btn = gradioApp().getElementById(tab + "_lora_extra_refresh_internal");
        if (btn) btn.dispatchEvent(new Event("click"));
    });
}

function lora_trainer_follow_queue() {
    // queued runs get their task ids in the server's queue thread, so the page cannot follow them through the
    // WebUI's progress API: it refreshes the status every 3 s until nothing is running or queued any more
    // (and gives up after 30 s if nothing ever ran, e.g. when the run was refused)
    if (window.lora_trainer_queue_timer) clearInterval(window.lora_trainer_queue_timer);
    var seenBusy = false, idlePolls = 0;
    lora_trainer_show_interrupt(true);
    window.lora_trainer_queue_timer = setInterval(function() {
        lora_trainer_refresh();
        var status = gradioApp().getElementById("lora_trainer_status");
        var busy = /\b(running|queued|paused)\b/.test(status ? status.textContent : "");
        if (busy) {
            seenBusy = true;
            idlePolls = 0;
            return;
        }
        idlePolls += 1;
        if (seenBusy || idlePolls >= 10) {
            clearInterval(window.lora_trainer_queue_timer);
            window.lora_trainer_queue_timer = null;
            lora_trainer_show_interrupt(false);
            lora_trainer_refresh_lora_lists();
        }
    }, 3000);
    return Array.from(arguments);
}

function lora_trainer_send_to_txt2img(text) {
    var prompt = gradioApp().querySelector("#txt2img_prompt textarea");
    if (prompt && text) {
        if (prompt.value.indexOf(text) === -1) {
            prompt.value = prompt.value ? prompt.value + ", " + text : text;
            updateInput(prompt);
        }
        switch_to_txt2img();
    }
    return [text];
}
