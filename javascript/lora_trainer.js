// Train LoRA: follow a run through the WebUI's progress API and send the result to txt2img.
// Everything here is scoped to the tab's elements (ids start with "lora_trainer_").

function lora_trainer_start() {
    var id = randomId();
    var status = gradioApp().getElementById("lora_trainer_status");
    requestProgress(
        id,
        gradioApp().getElementById("lora_trainer_progress"),
        gradioApp().getElementById("lora_trainer_gallery"),
        function() {
            var refresh = gradioApp().getElementById("lora_trainer_refresh");
            if (refresh) refresh.click();
            ["txt2img", "img2img"].forEach(function(tab) {
                var btn = gradioApp().getElementById(tab + "_lora_extra_refresh_internal");
                if (btn) btn.dispatchEvent(new Event("click"));
            });
        },
        function(progress) {
            if (status && progress.textinfo) status.innerHTML = progress.textinfo;
        },
        3600
    );
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

function lora_trainer_send_to_txt2img(text) {
    var prompt = gradioApp().querySelector("#txt2img_prompt textarea");
    if (prompt && text) {
        prompt.value = prompt.value ? prompt.value + ", " + text : text;
        updateInput(prompt);
        switch_to_txt2img();
    }
    return [text];
}

onUiLoaded(function() {
    var refresh = gradioApp().getElementById("lora_trainer_refresh");
    if (refresh) refresh.click();  // a run may already be going (page reloaded while training)
});
