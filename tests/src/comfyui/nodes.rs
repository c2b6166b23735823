//! The node types the stand-in really computes, with their definitions as
//! ComfyUI 0.3.64 publishes them in `/object_info`.
//!
//! Why it exists: tests of gpu-task and the gateway need a server that runs
//! a graph to real pixels without torch or model files. The nodes here are
//! the model-free ones of `comfyui-api.md` B.5 that the project's workflows
//! use, computed with ComfyUI's formulas (see each function). Their
//! definitions are a verbatim copy of the recorded
//! `shared/comfyui-samples/get-object_info.json` entries (`object_info.json`
//! next to this file; a test checks it against the sample), so validation and
//! `/object_info` say exactly what ComfyUI says.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rand::Rng;
use thiserror::Error;

use super::json::{dumps_python, py_str_repr, Json, Map};
use super::messages::{ImageRef, UiOutput};
use super::paths::{input_images, save_image_path, Dirs};
use super::tensor::{decode_png, encode_png, resize, Method, Tensor, TensorError};

/// The recorded definitions of the stand-in's node types.
const OBJECT_INFO: &str = include_str!("object_info.json");

/// All definitions, parsed once, in the order ComfyUI lists them.
pub fn definitions() -> &'static Map<Json> {
    static DEFINITIONS: OnceLock<Map<Json>> = OnceLock::new();
    DEFINITIONS.get_or_init(|| match Json::parse(OBJECT_INFO.as_bytes()) {
        Ok(Json::Object(map)) => map,
        other => {
            tracing::error!(?other, "the embedded object_info.json is not a JSON object");
            Map::new()
        }
    })
}

/// `GET /object_info`: every definition, with LoadImage's file list read
/// from the input directory now, as ComfyUI does on every request.
pub fn object_info(dirs: &Dirs) -> Map<Json> {
    definitions().iter().map(|(class, def)| (class.clone(), current(class, def, &dirs.input))).collect()
}

/// `GET /object_info/{class}`: one definition, or `None` for an unknown class.
pub fn node_info(class: &str, dirs: &Dirs) -> Option<Json> {
    definitions().get(class).map(|def| current(class, def, &dirs.input))
}

fn current(class: &str, def: &Json, input_dir: &Path) -> Json {
    let mut def = def.clone();
    if class == "LoadImage" {
        let files = Json::Array(input_images(input_dir).into_iter().map(Json::String).collect());
        if let Some(Json::Array(entry)) = def
            .as_object_mut()
            .and_then(|d| d.get_mut("input"))
            .and_then(|i| i.as_object_mut())
            .and_then(|i| i.get_mut("required"))
            .and_then(|r| r.as_object_mut())
            .and_then(|r| r.get_mut("image"))
        {
            if let Some(first) = entry.first_mut() {
                *first = files;
            }
        }
    }
    def
}

/// Where an input is declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// `input.required`.
    Required,
    /// `input.optional`.
    Optional,
    /// `input.hidden`.
    Hidden,
}

/// ComfyUI's `get_input_info`: the declared type and options of an input.
#[derive(Clone, Debug)]
pub struct InputInfo {
    /// Where it is declared.
    pub category: Category,
    /// The type: a name like `"INT"` or a combo list.
    pub kind: Json,
    /// The options object (`{}` when the declaration has none).
    pub extra: Json,
}

impl InputInfo {
    /// `(input_type, extra_info)` as ComfyUI puts it into error bodies.
    pub fn config(&self) -> Json {
        Json::Array(vec![self.kind.clone(), self.extra.clone()])
    }

    /// The type name, if it is a name.
    pub fn type_name(&self) -> Option<&str> {
        self.kind.as_str()
    }
}

/// A node type's definition.
#[derive(Clone, Copy, Debug)]
pub struct Definition {
    def: &'static Json,
}

impl Definition {
    /// The definition of `class`, if the stand-in has that node type.
    pub fn of(class: &str) -> Option<Definition> {
        definitions().get(class).map(|def| Definition { def })
    }

    /// `RETURN_TYPES`.
    pub fn output_types(&self) -> &'static [Json] {
        self.def.get("output").and_then(Json::as_array).map_or(&[], Vec::as_slice)
    }

    /// `OUTPUT_NODE`.
    pub fn is_output_node(&self) -> bool {
        self.def.get("output_node").and_then(Json::as_bool).unwrap_or(false)
    }

    /// The declaration of input `name`.
    pub fn input(&self, name: &str) -> Option<InputInfo> {
        let inputs = self.def.get("input")?;
        for (key, category) in
            [("required", Category::Required), ("optional", Category::Optional), ("hidden", Category::Hidden)]
        {
            if let Some(decl) = inputs.get(key).and_then(|group| group.get(name)) {
                let (kind, extra) = match decl {
                    Json::Array(parts) => (
                        parts.first().cloned().unwrap_or_default(),
                        parts.get(1).cloned().unwrap_or_else(|| Json::Object(Map::new())),
                    ),
                    // Hidden inputs are declared as a bare type string.
                    other => (other.clone(), Json::Object(Map::new())),
                };
                return Some(InputInfo { category, kind, extra });
            }
        }
        None
    }

    /// Required then optional input names, in declaration order.
    pub fn declared_inputs(&self) -> Vec<String> {
        ["required", "optional"]
            .iter()
            .filter_map(|group| self.def.get("input").and_then(|i| i.get(group)).and_then(Json::as_object))
            .flat_map(|group| group.keys().cloned())
            .collect()
    }

    /// Hidden inputs and their kinds (`PROMPT`, `EXTRA_PNGINFO`), in order.
    pub fn hidden_inputs(&self) -> Vec<(String, String)> {
        self.def
            .get("input")
            .and_then(|i| i.get("hidden"))
            .and_then(Json::as_object)
            .map(|h| h.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
            .unwrap_or_default()
    }
}

/// A value passed between nodes.
#[derive(Clone, Debug)]
pub enum Value {
    /// `IMAGE`: batch × height × width × 3.
    Image(Arc<Tensor>),
    /// `MASK`: batch × height × width.
    Mask(Arc<Tensor>),
}

impl Value {
    /// What ComfyUI's `format_value` would show (it prints the tensor; the
    /// stand-in names type and shape).
    pub fn describe(&self) -> String {
        match self {
            Value::Image(t) => format!("<IMAGE tensor of shape {}>", t.shape_text()),
            Value::Mask(t) => format!("<MASK tensor of shape {}>", t.shape_text()),
        }
    }
}

/// One argument of a node function.
#[derive(Clone, Debug)]
pub enum Arg {
    /// A widget value from the prompt (after validation's conversions).
    Literal(Json),
    /// An upstream node's output.
    Value(Value),
}

impl Arg {
    /// ComfyUI's `format_value` for `execution_error.current_inputs`.
    pub fn format(&self) -> Json {
        match self {
            Arg::Literal(v @ (Json::Null | Json::Bool(_) | Json::Number(_) | Json::String(_))) => v.clone(),
            Arg::Literal(other) => Json::String(other.py_str()),
            Arg::Value(v) => Json::String(v.describe()),
        }
    }
}

/// An exception a node raised, named like the Python one ComfyUI would show.
#[derive(Debug, Error, Clone, PartialEq)]
#[error("{exception_type}: {message}")]
pub struct NodeError {
    /// Full Python type name (`PIL.UnidentifiedImageError`, `TypeError`, …).
    pub exception_type: String,
    /// `str(exception)`.
    pub message: String,
}

impl NodeError {
    fn new(exception_type: &str, message: impl Into<String>) -> NodeError {
        NodeError { exception_type: exception_type.into(), message: message.into() }
    }
}

impl From<TensorError> for NodeError {
    fn from(e: TensorError) -> Self {
        NodeError::new(e.python_type(), e.to_string())
    }
}

/// The arguments of one node call, by input name, in prompt order.
pub struct Args {
    func: &'static str,
    map: Map<Arg>,
}

impl Args {
    /// Arguments for a call of `kind`.
    pub fn new(kind: Kind, map: Map<Arg>) -> Args {
        Args { func: kind.function(), map }
    }

    /// `current_inputs` of an `execution_error`.
    pub fn formatted(&self) -> Map<Vec<Json>> {
        self.map.iter().map(|(k, v)| (k.clone(), vec![v.format()])).collect()
    }

    fn get(&self, name: &str) -> Result<&Arg, NodeError> {
        self.map.get(name).ok_or_else(|| missing(self.func, name))
    }

    fn literal(&self, name: &str) -> Result<Option<&Json>, NodeError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Arg::Literal(v)) => Ok(Some(v)),
            Some(Arg::Value(v)) => {
                Err(NodeError::new("TypeError", format!("{name}: expected a widget value, got {}", v.describe())))
            }
        }
    }

    fn tensor(&self, name: &str, want_mask: bool) -> Result<Arc<Tensor>, NodeError> {
        match self.get(name)? {
            Arg::Value(Value::Image(t)) if !want_mask => Ok(t.clone()),
            Arg::Value(Value::Mask(t)) if want_mask => Ok(t.clone()),
            Arg::Value(other) => Err(NodeError::new(
                "RuntimeError",
                format!(
                    "{}: expected {}, got {}",
                    name,
                    if want_mask { "a MASK" } else { "an IMAGE" },
                    other.describe()
                ),
            )),
            Arg::Literal(v) => Err(NodeError::new(
                "AttributeError",
                format!("'{}' object has no attribute 'movedim'", v.py_type_name()),
            )),
        }
    }

    fn image(&self, name: &str) -> Result<Arc<Tensor>, NodeError> {
        self.tensor(name, false)
    }

    fn mask(&self, name: &str) -> Result<Arc<Tensor>, NodeError> {
        self.tensor(name, true)
    }

    fn optional_mask(&self, name: &str) -> Result<Option<Arc<Tensor>>, NodeError> {
        match self.map.get(name) {
            None | Some(Arg::Literal(Json::Null)) => Ok(None),
            Some(_) => self.mask(name).map(Some),
        }
    }

    fn int_or(&self, name: &str, default: Option<i128>) -> Result<i128, NodeError> {
        let value = match (self.literal(name)?, default) {
            (Some(v), _) => v,
            (None, Some(d)) => return Ok(d),
            (None, None) => return Err(missing(self.func, name)),
        };
        value.py_int().or_else(|| value.py_number().map(|f| f.trunc() as i128)).ok_or_else(|| {
            NodeError::new(
                "TypeError",
                format!("'{}' object cannot be interpreted as an integer", value.py_type_name()),
            )
        })
    }

    fn int(&self, name: &str) -> Result<i128, NodeError> {
        self.int_or(name, None)
    }

    fn size(&self, name: &str) -> Result<usize, NodeError> {
        let v = self.int(name)?;
        usize::try_from(v)
            .map_err(|_| NodeError::new("RuntimeError", format!("Trying to create tensor with negative dimension {v}")))
    }

    fn float(&self, name: &str) -> Result<f64, NodeError> {
        let value = self.literal(name)?.ok_or_else(|| missing(self.func, name))?;
        value
            .py_number()
            .ok_or_else(|| NodeError::new("TypeError", format!("must be real number, not {}", value.py_type_name())))
    }

    fn string_or(&self, name: &str, default: Option<&str>) -> Result<String, NodeError> {
        match (self.literal(name)?, default) {
            (Some(v), _) => Ok(v.py_str()),
            (None, Some(d)) => Ok(d.to_string()),
            (None, None) => Err(missing(self.func, name)),
        }
    }

    fn string(&self, name: &str) -> Result<String, NodeError> {
        self.string_or(name, None)
    }

    fn boolean(&self, name: &str) -> Result<bool, NodeError> {
        self.literal(name)?.map(Json::truthy).ok_or_else(|| missing(self.func, name))
    }
}

fn missing(func: &str, name: &str) -> NodeError {
    NodeError::new("TypeError", format!("{func}() missing 1 required positional argument: '{name}'"))
}

/// What a node call produced.
#[derive(Clone, Debug)]
pub struct Ran {
    /// One value per output slot.
    pub outputs: Vec<Value>,
    /// The UI output of an output node.
    pub ui: Option<UiOutput>,
}

impl Ran {
    fn value(v: Value) -> Ran {
        Ran { outputs: vec![v], ui: None }
    }
}

/// What a node call can see besides its arguments.
pub struct Ctx<'a> {
    /// File locations.
    pub dirs: &'a Dirs,
    /// The whole prompt (hidden input `PROMPT`, written into PNGs).
    pub prompt: &'a Map<Json>,
    /// `extra_data.extra_pnginfo` (hidden input `EXTRA_PNGINFO`).
    pub extra_pnginfo: Option<&'a Json>,
}

/// The node types the stand-in implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `nodes.SaveImage`.
    SaveImage,
    /// `nodes.PreviewImage`.
    PreviewImage,
    /// `nodes.LoadImage`.
    LoadImage,
    /// `nodes.ImageScale`.
    ImageScale,
    /// `nodes.ImageScaleBy`.
    ImageScaleBy,
    /// `nodes.ImageInvert`.
    ImageInvert,
    /// `nodes.EmptyImage`.
    EmptyImage,
    /// `nodes_mask.ImageCompositeMasked`.
    ImageCompositeMasked,
    /// `nodes_mask.MaskToImage`.
    MaskToImage,
    /// `nodes_mask.ImageToMask`.
    ImageToMask,
    /// `nodes_mask.SolidMask`.
    SolidMask,
    /// `nodes_mask.InvertMask`.
    InvertMask,
}

impl Kind {
    /// The implementation of `class`.
    pub fn of(class: &str) -> Option<Kind> {
        Some(match class {
            "SaveImage" => Kind::SaveImage,
            "PreviewImage" => Kind::PreviewImage,
            "LoadImage" => Kind::LoadImage,
            "ImageScale" => Kind::ImageScale,
            "ImageScaleBy" => Kind::ImageScaleBy,
            "ImageInvert" => Kind::ImageInvert,
            "EmptyImage" => Kind::EmptyImage,
            "ImageCompositeMasked" => Kind::ImageCompositeMasked,
            "MaskToImage" => Kind::MaskToImage,
            "ImageToMask" => Kind::ImageToMask,
            "SolidMask" => Kind::SolidMask,
            "InvertMask" => Kind::InvertMask,
            _ => return None,
        })
    }

    /// The Python `FUNCTION` name (for messages).
    pub fn function(self) -> &'static str {
        match self {
            Kind::SaveImage | Kind::PreviewImage => "save_images",
            Kind::LoadImage => "load_image",
            Kind::ImageScale | Kind::ImageScaleBy => "upscale",
            Kind::ImageInvert | Kind::InvertMask => "invert",
            Kind::EmptyImage => "generate",
            Kind::ImageCompositeMasked => "composite",
            Kind::MaskToImage => "mask_to_image",
            Kind::ImageToMask => "image_to_mask",
            Kind::SolidMask => "solid",
        }
    }

    /// The arguments of the node's `VALIDATE_INPUTS`, if it has one (then
    /// ComfyUI skips its own range and combo checks for them).
    pub fn validate_inputs_args(self) -> &'static [&'static str] {
        match self {
            Kind::LoadImage => &["image"],
            _ => &[],
        }
    }

    /// `VALIDATE_INPUTS`: `None` when fine, else the reason text.
    pub fn validate_input(self, name: &str, value: &Json, dirs: &Dirs) -> Option<String> {
        match (self, name) {
            (Kind::LoadImage, "image") => {
                let exists = value.as_str().is_some_and(|image| dirs.annotated_filepath(image).exists());
                (!exists).then(|| format!("Invalid image file: {}", value.py_str()))
            }
            _ => None,
        }
    }

    /// `IS_CHANGED`, part of the cache key: LoadImage hashes its file (a
    /// missing file makes the node never cached, like ComfyUI's NaN).
    pub fn is_changed(self, inputs: &Map<Json>, dirs: &Dirs) -> Json {
        match self {
            Kind::LoadImage => {
                let path = inputs.get("image").and_then(Json::as_str).map(|i| dirs.annotated_filepath(i));
                match path.and_then(|p| std::fs::read(p).ok()) {
                    Some(bytes) => {
                        let mut h = DefaultHasher::new();
                        bytes.hash(&mut h);
                        Json::String(format!("{:016x}-{}", h.finish(), bytes.len()))
                    }
                    None => Json::String(format!("nan-{}", uuid::Uuid::new_v4())),
                }
            }
            _ => Json::Bool(false),
        }
    }

    /// Runs the node.
    pub fn run(self, ctx: &Ctx<'_>, args: &Args) -> Result<Ran, NodeError> {
        match self {
            Kind::EmptyImage => empty_image(args),
            Kind::ImageInvert => Ok(Ran::value(Value::Image(Arc::new(args.image("image")?.inverted())))),
            Kind::InvertMask => Ok(Ran::value(Value::Mask(Arc::new(args.mask("mask")?.inverted())))),
            Kind::SolidMask => {
                let value = args.float("value")? as f32;
                let t = Tensor::filled(1, args.size("height")?, args.size("width")?, 1, |_| value)?;
                Ok(Ran::value(Value::Mask(Arc::new(t))))
            }
            Kind::MaskToImage => mask_to_image(args),
            Kind::ImageToMask => image_to_mask(args),
            Kind::ImageCompositeMasked => composite_masked(args),
            Kind::ImageScale => image_scale(args),
            Kind::ImageScaleBy => image_scale_by(args),
            Kind::LoadImage => load_image(ctx, args),
            Kind::SaveImage => {
                let prefix = args.string_or("filename_prefix", Some("ComfyUI"))?;
                save_images(ctx, &args.image("images")?, &prefix, &ctx.dirs.output, "output", false)
            }
            Kind::PreviewImage => {
                // PreviewImage appends "_temp_" and five letters from this
                // (sic) alphabet to its prefix and writes to temp/.
                const ALPHABET: &[u8] = b"abcdefghijklmnopqrstupvxyz";
                let mut rng = rand::thread_rng();
                let suffix: String = (0..5).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect();
                let prefix = format!("{}_temp_{suffix}", args.string_or("filename_prefix", Some("ComfyUI"))?);
                save_images(ctx, &args.image("images")?, &prefix, &ctx.dirs.temp, "temp", true)
            }
        }
    }
}

/// `EmptyImage.generate`: three `torch.full` planes from `0xRRGGBB`.
fn empty_image(args: &Args) -> Result<Ran, NodeError> {
    let (width, height) = (args.size("width")?, args.size("height")?);
    let batch = usize::try_from(args.int_or("batch_size", Some(1))?)
        .map_err(|_| NodeError::new("RuntimeError", "Trying to create tensor with negative dimension"))?;
    let color = args.int_or("color", Some(0))?;
    let channel = |shift: u32| (((color >> shift) & 0xFF) as f64 / 255.0) as f32;
    let rgb = [channel(16), channel(8), channel(0)];
    let t = Tensor::filled(batch, height, width, 3, |c| rgb[c])?;
    Ok(Ran::value(Value::Image(Arc::new(t))))
}

/// `MaskToImage`: the mask expanded to three equal channels.
fn mask_to_image(args: &Args) -> Result<Ran, NodeError> {
    let mask = args.mask("mask")?;
    let mut t = Tensor::filled(mask.batch, mask.height, mask.width, 3, |_| 0.0)?;
    for (px, &m) in t.data.chunks_exact_mut(3).zip(&mask.data) {
        px.fill(m);
    }
    Ok(Ran::value(Value::Image(Arc::new(t))))
}

/// `ImageToMask`: one channel of the image.
fn image_to_mask(args: &Args) -> Result<Ran, NodeError> {
    let image = args.image("image")?;
    let channel = args.string("channel")?;
    let index = ["red", "green", "blue", "alpha"]
        .iter()
        .position(|c| *c == channel)
        .ok_or_else(|| NodeError::new("ValueError", format!("{} is not in list", py_str_repr(&channel))))?;
    if index >= image.channels {
        return Err(NodeError::new(
            "IndexError",
            format!("index {index} is out of bounds for dimension 3 with size {}", image.channels),
        ));
    }
    let data = image.data.chunks_exact(image.channels).map(|px| px[index]).collect();
    let t = Tensor { batch: image.batch, height: image.height, width: image.width, channels: 1, data };
    Ok(Ran::value(Value::Mask(Arc::new(t))))
}

/// `ImageCompositeMasked` → `node_helpers.composite` with multiplier 1.
fn composite_masked(args: &Args) -> Result<Ran, NodeError> {
    let destination = args.image("destination")?;
    let source = args.image("source")?;
    let (x, y) = (args.int("x")?, args.int("y")?);
    let resize_source = args.boolean("resize_source")?;
    let mask = args.optional_mask("mask")?;
    let out = composite(&destination, &source, x, y, mask.as_deref(), resize_source)?;
    Ok(Ran::value(Value::Image(Arc::new(out))))
}

/// `comfy_extras.nodes_mask.composite` (multiplier 1): paste `source` at
/// (x, y), blended by `mask` (resized bilinearly to the source).
pub fn composite(
    destination: &Tensor,
    source: &Tensor,
    x: i128,
    y: i128,
    mask: Option<&Tensor>,
    resize_source: bool,
) -> Result<Tensor, TensorError> {
    let mut out = destination.clone();
    let source = if resize_source {
        resize(source, destination.width, destination.height, Method::Bilinear)?
    } else {
        source.clone()
    }
    .repeat_to_batch(destination.batch);
    let (sw, sh) = (source.width as i128, source.height as i128);
    let (dw, dh) = (destination.width as i128, destination.height as i128);
    // ComfyUI clamps to [-source, destination]; negative offsets cannot pass
    // validation (min 0), so they are treated as 0 here.
    let left = x.clamp(-sw, dw).max(0) as usize;
    let top = y.clamp(-sh, dh).max(0) as usize;
    let mask = match mask {
        Some(m) => Some(resize(m, source.width, source.height, Method::Bilinear)?.repeat_to_batch(source.batch)),
        None => None,
    };
    let rows = source.height.min(destination.height - top);
    let cols = source.width.min(destination.width - left);
    for b in 0..destination.batch {
        for yy in 0..rows {
            for xx in 0..cols {
                let m = mask.as_ref().map_or(1.0, |m| m.at(b, yy, xx, 0));
                for c in 0..destination.channels.min(source.channels) {
                    let at = out.index(b, top + yy, left + xx, c);
                    out.data[at] = m * source.at(b, yy, xx, c) + (1.0 - m) * destination.data[at];
                }
            }
        }
    }
    Ok(out)
}

/// `ImageScale.upscale`: a zero side keeps the aspect ratio; both zero is a no-op.
fn image_scale(args: &Args) -> Result<Ran, NodeError> {
    let image = args.image("image")?;
    let method = method(&args.string("upscale_method")?)?;
    let (mut width, mut height) = (args.size("width")?, args.size("height")?);
    let crop = args.string("crop")?;
    if width == 0 && height == 0 {
        return Ok(Ran::value(Value::Image(image)));
    }
    if width == 0 {
        width = ((image.width as f64 * height as f64 / image.height as f64).round_ties_even() as usize).max(1);
    } else if height == 0 {
        height = ((image.height as f64 * width as f64 / image.width as f64).round_ties_even() as usize).max(1);
    }
    let out = common_upscale(&image, width, height, method, crop == "center")?;
    Ok(Ran::value(Value::Image(Arc::new(out))))
}

/// `ImageScaleBy.upscale`: both sides times `scale_by`, rounded like Python.
fn image_scale_by(args: &Args) -> Result<Ran, NodeError> {
    let image = args.image("image")?;
    let method = method(&args.string("upscale_method")?)?;
    let scale = args.float("scale_by")?;
    let width = (image.width as f64 * scale).round_ties_even().max(0.0) as usize;
    let height = (image.height as f64 * scale).round_ties_even().max(0.0) as usize;
    let out = common_upscale(&image, width, height, method, false)?;
    Ok(Ran::value(Value::Image(Arc::new(out))))
}

fn method(name: &str) -> Result<Method, NodeError> {
    Method::parse(name)
        .ok_or_else(|| NodeError::new("NotImplementedError", format!("unsupported upscale_method {name}")))
}

/// `comfy.utils.common_upscale` with optional centre crop to the new aspect.
fn common_upscale(
    t: &Tensor,
    width: usize,
    height: usize,
    method: Method,
    center: bool,
) -> Result<Tensor, TensorError> {
    let cropped;
    let source = if center && t.width > 0 && t.height > 0 && width > 0 && height > 0 {
        let old_aspect = t.width as f64 / t.height as f64;
        let new_aspect = width as f64 / height as f64;
        let (mut x, mut y) = (0usize, 0usize);
        if old_aspect > new_aspect {
            x = ((t.width as f64 - t.width as f64 * (new_aspect / old_aspect)) / 2.0).round_ties_even() as usize;
        } else if old_aspect < new_aspect {
            y = ((t.height as f64 - t.height as f64 * (old_aspect / new_aspect)) / 2.0).round_ties_even() as usize;
        }
        cropped = t.crop(y, t.height.saturating_sub(2 * y), x, t.width.saturating_sub(2 * x));
        &cropped
    } else {
        t
    };
    resize(source, width, height, method)
}

/// `LoadImage.load_image`: RGB plus mask from a file in input/ (or an
/// annotated directory). The stand-in reads PNG only.
fn load_image(ctx: &Ctx<'_>, args: &Args) -> Result<Ran, NodeError> {
    let name = args.string("image")?;
    let path = ctx.dirs.annotated_filepath(&name);
    let shown = py_str_repr(&path.to_string_lossy());
    if path.is_dir() {
        return Err(NodeError::new("IsADirectoryError", format!("[Errno 21] Is a directory: {shown}")));
    }
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            NodeError::new("FileNotFoundError", format!("[Errno 2] No such file or directory: {shown}"))
        }
        _ => NodeError::new("OSError", format!("[Errno {}] {e}: {shown}", e.raw_os_error().unwrap_or(0))),
    })?;
    let (image, mask) = decode_png(&bytes).map_err(|e| match e {
        super::tensor::DecodeError::Tensor(t) => NodeError::from(t),
        _ => NodeError::new("PIL.UnidentifiedImageError", format!("cannot identify image file {shown}")),
    })?;
    Ok(Ran { outputs: vec![Value::Image(Arc::new(image)), Value::Mask(Arc::new(mask))], ui: None })
}

/// `SaveImage.save_images` (and PreviewImage's): one PNG per batch item,
/// named `<prefix>_<counter:05>_.png`, with the prompt and extra_pnginfo as
/// `tEXt` chunks.
fn save_images(
    ctx: &Ctx<'_>,
    images: &Arc<Tensor>,
    prefix: &str,
    dir: &Path,
    kind: &str,
    fast: bool,
) -> Result<Ran, NodeError> {
    let target =
        save_image_path(prefix, dir, images.width, images.height).map_err(|m| NodeError::new("Exception", m))?;
    let mut texts = vec![("prompt".to_string(), dumps_python(ctx.prompt))];
    if let Some(Json::Object(extra)) = ctx.extra_pnginfo {
        texts.extend(extra.iter().map(|(k, v)| (k.clone(), dumps_python(v))));
    }
    let mut results = Vec::with_capacity(images.batch);
    for (b, counter) in (0..images.batch).zip(target.counter..) {
        let stem = target.filename.replace("%batch_num%", &b.to_string());
        let file = format!("{stem}_{counter:05}_.png");
        let png = encode_png(images, b, &texts, fast).map_err(|e| NodeError::new("ValueError", e.to_string()))?;
        let path = target.folder.join(&file);
        std::fs::write(&path, png).map_err(|e| {
            NodeError::new(
                "OSError",
                format!("[Errno {}] {e}: {}", e.raw_os_error().unwrap_or(0), py_str_repr(&path.to_string_lossy())),
            )
        })?;
        results.push(ImageRef { filename: file, subfolder: target.subfolder.clone(), kind: kind.to_string() });
    }
    Ok(Ran { outputs: Vec::new(), ui: Some(UiOutput { images: results }) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_parse_and_describe_inputs() {
        let defs = definitions();
        assert_eq!(defs.len(), 12);
        for class in defs.keys() {
            assert!(Kind::of(class).is_some(), "{class} has no implementation");
        }
        let scale = Definition::of("ImageScale").unwrap();
        assert_eq!(scale.output_types(), &[Json::from("IMAGE")]);
        let width = scale.input("width").unwrap();
        assert_eq!(width.category, Category::Required);
        assert_eq!(width.extra.get("max"), Some(&Json::from(16384i64)));
        assert!(Definition::of("SaveImage").unwrap().is_output_node());
        assert_eq!(Definition::of("ImageCompositeMasked").unwrap().input("mask").unwrap().category, Category::Optional);
    }

    #[test]
    fn composite_pastes_at_offset() {
        let dest = Tensor::filled(1, 4, 4, 3, |_| 0.0).unwrap();
        let src = Tensor::filled(1, 4, 4, 3, |_| 1.0).unwrap();
        let out = composite(&dest, &src, 2, 1, None, false).unwrap();
        assert_eq!(out.at(0, 0, 3, 0), 0.0);
        assert_eq!(out.at(0, 1, 1, 0), 0.0);
        assert_eq!(out.at(0, 1, 2, 0), 1.0);
        assert_eq!(out.at(0, 3, 3, 2), 1.0);
        let half = Tensor::filled(1, 2, 2, 1, |_| 0.5).unwrap();
        let out = composite(&dest, &src, 0, 0, Some(&half), false).unwrap();
        assert_eq!(out.at(0, 3, 3, 0), 0.5);
    }
}
