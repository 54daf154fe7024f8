"""modules/options.py: OptionInfo (same signature and chainable helpers as v1.10.1 `modules/options.py:13-58`),
options_section, and Options with `data`, attribute access, set(is_api=..., run_callbacks=...) and add_option."""


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label, url):
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label, js_func):
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html):
        self.comment_after += html
        return self

    def needs_restart(self):
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self):
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


def options_section(section_identifier, options_dict):
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


class Options:
    def __init__(self, defaults):
        object.__setattr__(self, "data", dict(defaults))
        object.__setattr__(self, "data_labels", {k: OptionInfo(v) for k, v in defaults.items()})

    def __getattr__(self, item):
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        labels = object.__getattribute__(self, "data_labels")
        if item in labels:  # a registered option not (yet) in the settings file: its default
            return labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        info = self.data_labels.get(key)
        comp_args = info.component_args if info else None
        if isinstance(comp_args, dict) and comp_args.get("visible", True) is False:
            raise RuntimeError(f"not possible to set '{key}' because it is restricted")
        self.data[key] = value

    def set(self, key, value, is_api=False, run_callbacks=True):
        old = self.data.get(key)
        if old == value:
            return False
        info = self.data_labels.get(key)
        if info is not None and info.do_not_save:
            return False
        if is_api and info is not None and info.restrict_api:
            return False
        try:
            setattr(self, key, value)
        except RuntimeError:
            return False
        if run_callbacks and info is not None and info.onchange is not None:
            info.onchange()
        return True

    def get_default(self, key):
        info = self.data_labels.get(key)
        return info.default if info else None

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default
