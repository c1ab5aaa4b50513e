// Shows text a UniAlign node returns on the node after it has run:
// - "UniAlign Understand": its captions / answers;
// - the image nodes and UniAlign Native Text Encode: a warning naming what was cut from a prompt over the model's
//   token limit (empty: none).
// The node returns {"ui": {"text": [...]}}; ComfyUI hands that to onExecuted.
// The text is shown in a read-only textarea widget that is neither sent as an input nor saved in the workflow's
// widgets_values (it is not an input: saving it would shift the real widget values on load).
// Public frontend API only: `app`, app.registerExtension and node.addDOMWidget, which the classic frontend (since
// late 2023, e.g. the March 2024 ComfyUI) and the current one both have; nothing from scripts/widgets.js.
import { app } from "../../scripts/app.js";

const TEXT_NODES = { UniAlignUnderstand: "result_text" };
const WARNING_NODES = [
  "UniAlignTextToImage",
  "UniAlignEdit",
  "UniAlignPerceive",
  "UniAlignCompose",
  "UniAlignNativeTextEncode",
];
const WARNING_WIDGET = "warnings";

function widgetName(nodeName) {
  return TEXT_NODES[nodeName] ?? WARNING_WIDGET;
}

// A read-only multiline text widget: a textarea in the node (styled as ComfyUI's own multiline inputs).
function addTextWidget(node, name) {
  const textarea = document.createElement("textarea");
  textarea.className = "comfy-multiline-input";
  textarea.readOnly = true;
  textarea.style.opacity = 0.85;
  const widget = node.addDOMWidget(name, "customtext", textarea, {
    getValue: () => textarea.value,
    setValue: (value) => {
      textarea.value = value;
    },
    serialize: false, // never sent as an input (both frontends skip it when making the prompt)
  });
  widget.serialize = false; // the current frontend leaves it out of widgets_values
  return widget;
}

function showText(node, name, texts) {
  const list = Array.isArray(texts) ? texts : [texts];
  let widget = node.widgets?.find((w) => w.name === name);
  if (!list.length && !widget) return; // nothing to say, nothing shown before
  const value = list.length > 1 ? list.map((t, i) => `[${i + 1}] ${t}`).join("\n\n") : String(list[0] ?? "");
  widget ??= addTextWidget(node, name);
  widget.value = value;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    size[0] = Math.max(size[0], node.size[0]);
    size[1] = Math.max(size[1], node.size[1]);
    node.setSize?.(size);
    node.setDirtyCanvas?.(true, false);
  });
}

// Drop the shown text from a saved node (both frontends call onSerialize after filling widgets_values; the classic
// one keeps every widget's value there).
export function dropShownText(node, data, name) {
  const index = node.widgets?.findIndex((w) => w.name === name) ?? -1;
  const values = data?.widgets_values;
  if (index >= 0 && Array.isArray(values) && index < values.length && values[index] === node.widgets[index].value) {
    values.splice(index, 1);
  }
}

app.registerExtension({
  name: "UniAlignment.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const nodeName = nodeData?.name;
    if (!(nodeName in TEXT_NODES) && !WARNING_NODES.includes(nodeName)) return;
    const name = widgetName(nodeName);
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, name, message.text);
    };
    const onSerialize = nodeType.prototype.onSerialize;
    nodeType.prototype.onSerialize = function (data) {
      onSerialize?.apply(this, arguments);
      dropShownText(this, data, name);
    };
  },
});
