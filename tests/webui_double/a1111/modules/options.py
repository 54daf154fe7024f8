"""modules/options.py: Options with `data`, attribute access and set(run_callbacks=...)."""


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 **kwargs):
        self.default = default
        self.label = label
        self.onchange = onchange
        self.section = section


class Options:
    def __init__(self, defaults):
        object.__setattr__(self, "data", dict(defaults))
        object.__setattr__(self, "data_labels", {k: OptionInfo(v) for k, v in defaults.items()})

    def __getattr__(self, item):
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value

    def set(self, key, value, is_api=False, run_callbacks=True):
        old = self.data.get(key)
        if old == value:
            return False
        self.data[key] = value
        info = self.data_labels.get(key)
        if run_callbacks and info is not None and info.onchange is not None:
            info.onchange()
        return True

    def get_default(self, key):
        info = self.data_labels.get(key)
        return info.default if info else None
