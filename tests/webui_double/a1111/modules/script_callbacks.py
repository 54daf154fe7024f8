"""modules/script_callbacks.py: the registration functions the extension calls."""

callbacks_ui_tabs = []
callbacks_app_started = []
callbacks_script_unloaded = []
callbacks_ui_settings = []


def on_ui_tabs(callback, *, name=None):
    callbacks_ui_tabs.append(callback)


def on_app_started(callback, *, name=None):
    callbacks_app_started.append(callback)


def on_script_unloaded(callback, *, name=None):
    callbacks_script_unloaded.append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks_ui_settings.append(callback)


def clear_callbacks():
    for lst in (callbacks_ui_tabs, callbacks_app_started, callbacks_script_unloaded, callbacks_ui_settings):
        lst.clear()
