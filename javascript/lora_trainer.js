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
            ["txt2img", "img2img"].forEach(function(tab) {
                var btn = gradioApp().getElementById(tab + "_lora_extra_refresh_internal");
                if (btn) btn.dispatchEvent(new Event("click"));
            });
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
