//! Images and masks held the way ComfyUI holds them, the resampling its
//! nodes use, and PNG in and out.
//!
//! Why it exists: the stand-in must compute real pixels so that tests can
//! check an output image by value. ComfyUI's `IMAGE` is a float tensor
//! `batch × height × width × 3` in 0..1 and `MASK` is `batch × height × width`;
//! both are a [`Tensor`] here (a mask has one channel). The resizers follow
//! the formulas of `torch.nn.functional.interpolate` (align_corners=False)
//! and, for `lanczos`, Pillow's fixed-point resampler, because that is what
//! `comfy.utils.common_upscale` calls.

use thiserror::Error;

/// The largest tensor the stand-in allocates (elements). ComfyUI has no such
/// limit; the stand-in has one so that a test graph cannot eat the machine.
pub const MAX_ELEMENTS: usize = 1 << 26;

/// Why a tensor operation failed, phrased as the Python exception ComfyUI
/// would show.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TensorError {
    /// The tensor would exceed [`MAX_ELEMENTS`].
    #[error("the ComfyUI stand-in does not allocate a {0} tensor (limit {MAX_ELEMENTS} elements)")]
    TooLarge(String),
    /// A resize to or from an empty size (torch's message).
    #[error("Input and output sizes should be greater than 0, but got input (H: {in_h}, W: {in_w}) output (H: {out_h}, W: {out_w})")]
    EmptySize {
        /// Input height.
        in_h: usize,
        /// Input width.
        in_w: usize,
        /// Output height.
        out_h: usize,
        /// Output width.
        out_w: usize,
    },
}

impl TensorError {
    /// The Python exception type ComfyUI would report.
    pub fn python_type(&self) -> &'static str {
        match self {
            TensorError::TooLarge(_) => "MemoryError",
            TensorError::EmptySize { .. } => "RuntimeError",
        }
    }
}

/// A dense float tensor in `batch, height, width, channels` order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Batch size.
    pub batch: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Channels per pixel: 3 for IMAGE, 1 for MASK.
    pub channels: usize,
    /// `batch * height * width * channels` values.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor filled with `fill(channel)`, refusing oversized shapes.
    pub fn filled(
        batch: usize,
        height: usize,
        width: usize,
        channels: usize,
        fill: impl Fn(usize) -> f32,
    ) -> Result<Tensor, TensorError> {
        let len = checked_len(batch, height, width, channels)?;
        let mut data = Vec::with_capacity(len);
        let pixel: Vec<f32> = (0..channels).map(&fill).collect();
        for _ in 0..batch * height * width {
            data.extend_from_slice(&pixel);
        }
        Ok(Tensor { batch, height, width, channels, data })
    }

    /// Index of element `(b, y, x, c)` in `data`.
    pub fn index(&self, b: usize, y: usize, x: usize, c: usize) -> usize {
        ((b * self.height + y) * self.width + x) * self.channels + c
    }

    /// Element `(b, y, x, c)`.
    pub fn at(&self, b: usize, y: usize, x: usize, c: usize) -> f32 {
        self.data[self.index(b, y, x, c)]
    }

    /// The shape as torch prints it, for messages.
    pub fn shape_text(&self) -> String {
        if self.channels == 1 {
            format!("[{}, {}, {}]", self.batch, self.height, self.width)
        } else {
            format!("[{}, {}, {}, {}]", self.batch, self.height, self.width, self.channels)
        }
    }

    /// `1.0 - x` for every element.
    pub fn inverted(&self) -> Tensor {
        Tensor { data: self.data.iter().map(|v| 1.0 - v).collect(), ..self.clone() }
    }

    /// Rows `y0..y0+h` and columns `x0..x0+w` (torch `narrow` on both axes).
    pub fn crop(&self, y0: usize, h: usize, x0: usize, w: usize) -> Tensor {
        let mut data = Vec::with_capacity(self.batch * h * w * self.channels);
        for b in 0..self.batch {
            for y in y0..y0 + h {
                let start = self.index(b, y, x0, 0);
                data.extend_from_slice(&self.data[start..start + w * self.channels]);
            }
        }
        Tensor { batch: self.batch, height: h, width: w, channels: self.channels, data }
    }

    /// `comfy.utils.repeat_to_batch_size`: cut or cycle the batch to `batch`.
    pub fn repeat_to_batch(&self, batch: usize) -> Tensor {
        if batch == self.batch || self.batch == 0 {
            return self.clone();
        }
        let plane = self.height * self.width * self.channels;
        let mut data = Vec::with_capacity(batch * plane);
        for b in 0..batch {
            let src = b % self.batch;
            data.extend_from_slice(&self.data[src * plane..(src + 1) * plane]);
        }
        Tensor { batch, data, ..self.clone() }
    }
}

/// The element count of a shape, if the stand-in allows it.
pub fn checked_len(batch: usize, height: usize, width: usize, channels: usize) -> Result<usize, TensorError> {
    let too_large = || TensorError::TooLarge(format!("{batch}x{height}x{width}x{channels}"));
    let len = batch
        .checked_mul(height)
        .and_then(|n| n.checked_mul(width))
        .and_then(|n| n.checked_mul(channels))
        .ok_or_else(too_large)?;
    if len > MAX_ELEMENTS {
        return Err(too_large());
    }
    Ok(len)
}

/// The `upscale_method` values of `ImageScale` / `ImageScaleBy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// torch `nearest-exact`.
    NearestExact,
    /// torch `bilinear`, align_corners=False, no antialias.
    Bilinear,
    /// torch `area` (adaptive average pooling).
    Area,
    /// torch `bicubic` (A = -0.75), align_corners=False.
    Bicubic,
    /// Pillow `LANCZOS` on the image quantized to 8 bits, as ComfyUI does.
    Lanczos,
}

impl Method {
    /// The method named `name` in ComfyUI's combo.
    pub fn parse(name: &str) -> Option<Method> {
        Some(match name {
            "nearest-exact" => Method::NearestExact,
            "bilinear" => Method::Bilinear,
            "area" => Method::Area,
            "bicubic" => Method::Bicubic,
            "lanczos" => Method::Lanczos,
            _ => return None,
        })
    }
}

/// Resizes every plane of `t` to `out_w × out_h` (`F.interpolate` semantics).
pub fn resize(t: &Tensor, out_w: usize, out_h: usize, method: Method) -> Result<Tensor, TensorError> {
    if t.width == 0 || t.height == 0 || out_w == 0 || out_h == 0 {
        return Err(TensorError::EmptySize { in_h: t.height, in_w: t.width, out_h, out_w });
    }
    checked_len(t.batch, out_h, out_w, t.channels)?;
    Ok(match method {
        Method::NearestExact => separable_gather(t, out_w, out_h, nearest_exact_taps),
        Method::Bilinear => separable_gather(t, out_w, out_h, linear_taps),
        Method::Bicubic => separable_gather(t, out_w, out_h, cubic_taps),
        Method::Area => separable_gather(t, out_w, out_h, area_taps),
        Method::Lanczos => lanczos(t, out_w, out_h),
    })
}

/// Per output index: the input indices and their weights.
type Taps = Vec<Vec<(usize, f32)>>;

/// Applies per-axis taps as a 2-D weighted sum: `Σ_y wy · (Σ_x wx · in)`.
fn separable_gather(t: &Tensor, out_w: usize, out_h: usize, taps: fn(usize, usize) -> Taps) -> Tensor {
    let xs = taps(t.width, out_w);
    let ys = taps(t.height, out_h);
    let c = t.channels;
    let mut data = vec![0f32; t.batch * out_h * out_w * c];
    for b in 0..t.batch {
        for (oy, ytaps) in ys.iter().enumerate() {
            for (ox, xtaps) in xs.iter().enumerate() {
                for ch in 0..c {
                    let mut acc = 0f32;
                    for &(iy, wy) in ytaps {
                        let mut row = 0f32;
                        for &(ix, wx) in xtaps {
                            row += wx * t.at(b, iy, ix, ch);
                        }
                        acc += wy * row;
                    }
                    data[((b * out_h + oy) * out_w + ox) * c + ch] = acc;
                }
            }
        }
    }
    Tensor { batch: t.batch, height: out_h, width: out_w, channels: c, data }
}

/// torch `nearest-exact`: `floor((o + 0.5) * in / out)`, clamped.
fn nearest_exact_taps(input: usize, output: usize) -> Taps {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let i = (((o as f32) + 0.5) * scale).floor() as usize;
            vec![(i.min(input - 1), 1.0)]
        })
        .collect()
}

/// torch `bilinear` along one axis (`area_pixel_compute_source_index`).
fn linear_taps(input: usize, output: usize) -> Taps {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            let l0 = 1.0 - l1;
            vec![(i0, l0), (i1, l1)]
        })
        .collect()
}

/// torch `bicubic` along one axis (A = -0.75, indices clamped to the edge).
fn cubic_taps(input: usize, output: usize) -> Taps {
    const A: f32 = -0.75;
    let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let real = scale * (o as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(input as i64 - 1);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let weights = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
            weights
                .iter()
                .enumerate()
                .map(|(j, &w)| ((index - 1 + j as i64).clamp(0, input as i64 - 1) as usize, w))
                .collect()
        })
        .collect()
}

/// torch `area` = `adaptive_avg_pool2d` along one axis.
fn area_taps(input: usize, output: usize) -> Taps {
    (0..output)
        .map(|o| {
            let start = o * input / output;
            let end = ((o + 1) * input).div_ceil(output);
            let n = (end - start) as f32;
            (start..end).map(|i| (i, 1.0 / n)).collect()
        })
        .collect()
}

/// `comfy.utils.lanczos`: quantize to u8 like `np.clip(255*x).astype(uint8)`,
/// resize with Pillow's LANCZOS, divide by 255.
fn lanczos(t: &Tensor, out_w: usize, out_h: usize) -> Tensor {
    let c = t.channels;
    let mut out = Vec::with_capacity(t.batch * out_h * out_w * c);
    for b in 0..t.batch {
        let plane = &t.data[t.index(b, 0, 0, 0)..t.index(b, 0, 0, 0) + t.height * t.width * c];
        let bytes: Vec<u8> = plane.iter().map(|&v| to_u8(v)).collect();
        let resized = pil::resample(&bytes, t.width, t.height, c, out_w, out_h);
        out.extend(resized.iter().map(|&v| f32::from(v) / 255.0));
    }
    Tensor { batch: t.batch, height: out_h, width: out_w, channels: c, data: out }
}

/// `np.clip(255. * v, 0, 255).astype(np.uint8)`: truncation, not rounding.
pub fn to_u8(v: f32) -> u8 {
    let scaled = 255.0f32 * v;
    if scaled.is_nan() {
        0
    } else {
        scaled.clamp(0.0, 255.0) as u8
    }
}

/// Pillow's `ImagingResample` with the LANCZOS filter, 8 bits per channel.
mod pil {
    const PRECISION_BITS: u32 = 32 - 8 - 2;

    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }

    fn lanczos_filter(x: f64) -> f64 {
        if (-3.0..3.0).contains(&x) {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    }

    /// Per output index: first input index and fixed-point coefficients.
    fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 3.0 * filterscale;
        (0..out_size)
            .map(|xx| {
                let center = (xx as f64 + 0.5) * scale;
                let ss = 1.0 / filterscale;
                let xmin = ((center - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let count = xmax.saturating_sub(xmin);
                let mut k: Vec<f64> =
                    (0..count).map(|x| lanczos_filter((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
                let ww: f64 = k.iter().sum();
                if ww != 0.0 {
                    k.iter_mut().for_each(|w| *w /= ww);
                }
                let fixed = k
                    .iter()
                    .map(|&w| {
                        let scaled = w * f64::from(1u32 << PRECISION_BITS);
                        if w < 0.0 {
                            (scaled - 0.5) as i64
                        } else {
                            (scaled + 0.5) as i64
                        }
                    })
                    .collect();
                (xmin, fixed)
            })
            .collect()
    }

    fn clip8(v: i64) -> u8 {
        let v = v >> PRECISION_BITS;
        v.clamp(0, 255) as u8
    }

    /// Resizes an interleaved `w × h × c` u8 image, horizontal pass first.
    pub fn resample(src: &[u8], w: usize, h: usize, c: usize, out_w: usize, out_h: usize) -> Vec<u8> {
        let (mut cur, mut cur_w) = (src.to_vec(), w);
        if out_w != w {
            let coeffs = coefficients(w, out_w);
            let mut next = vec![0u8; out_w * h * c];
            for y in 0..h {
                for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                    for ch in 0..c {
                        let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                        for (i, &kv) in k.iter().enumerate() {
                            ss += i64::from(cur[(y * cur_w + xmin + i) * c + ch]) * kv;
                        }
                        next[(y * out_w + xx) * c + ch] = clip8(ss);
                    }
                }
            }
            cur = next;
            cur_w = out_w;
        }
        if out_h != h {
            let coeffs = coefficients(h, out_h);
            let mut next = vec![0u8; cur_w * out_h * c];
            for (yy, (ymin, k)) in coeffs.iter().enumerate() {
                for x in 0..cur_w {
                    for ch in 0..c {
                        let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                        for (i, &kv) in k.iter().enumerate() {
                            ss += i64::from(cur[((ymin + i) * cur_w + x) * c + ch]) * kv;
                        }
                        next[(yy * cur_w + x) * c + ch] = clip8(ss);
                    }
                }
            }
            cur = next;
        }
        cur
    }
}

/// Why a file could not be read as an image.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// Not a PNG the stand-in can read (Pillow reads more formats).
    #[error("not a readable PNG: {0}")]
    Png(#[from] png::DecodingError),
    /// The decoded image has an unexpected layout.
    #[error("unsupported PNG layout")]
    Layout,
    /// Too large for the stand-in.
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// `LoadImage` on PNG bytes: the RGB image and its mask (`1 - alpha`, or a
/// 64×64 zero mask when the image has no alpha, like ComfyUI).
pub fn decode_png(bytes: &[u8]) -> Result<(Tensor, Tensor), DecodeError> {
    let mut decoder = png::Decoder::new(bytes);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info()?;
    let (source_type, has_trns) = {
        let info = reader.info();
        (info.color_type, info.trns.is_some())
    };
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf)?;
    let (w, h) = (frame.width as usize, frame.height as usize);
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(DecodeError::Layout),
    };
    let pixels = &buf[..frame.buffer_size()];
    if pixels.len() < w * h * channels {
        return Err(DecodeError::Layout);
    }
    checked_len(1, h, w, 3)?;
    // Pillow gives an 'A' band for RGBA / LA and for palette images with
    // tRNS; a tRNS on grey or RGB stays "transparency" info and no mask.
    let alpha_is_mask = matches!(source_type, png::ColorType::Rgba | png::ColorType::GrayscaleAlpha)
        || (source_type == png::ColorType::Indexed && has_trns);
    let mut rgb = Vec::with_capacity(w * h * 3);
    let mut alpha = Vec::with_capacity(w * h);
    for px in pixels.chunks_exact(channels).take(w * h) {
        let (r, g, b, a) = match channels {
            1 => (px[0], px[0], px[0], 255),
            2 => (px[0], px[0], px[0], px[1]),
            3 => (px[0], px[1], px[2], 255),
            _ => (px[0], px[1], px[2], px[3]),
        };
        rgb.extend([r, g, b].map(|v| f32::from(v) / 255.0));
        alpha.push(1.0 - f32::from(a) / 255.0);
    }
    let image = Tensor { batch: 1, height: h, width: w, channels: 3, data: rgb };
    let mask = if alpha_is_mask {
        Tensor { batch: 1, height: h, width: w, channels: 1, data: alpha }
    } else {
        Tensor::filled(1, 64, 64, 1, |_| 0.0)?
    };
    Ok((image, mask))
}

/// Why an image could not be written.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// The PNG encoder failed.
    #[error("PNG encoding failed: {0}")]
    Png(#[from] png::EncodingError),
    /// The tensor is not an RGB image.
    #[error("cannot save a tensor of shape {0} as an image")]
    Shape(String),
}

/// One batch item of an IMAGE as an 8-bit RGB PNG with `tEXt` chunks, the
/// way `SaveImage` writes it (values truncated, not rounded).
pub fn encode_png(t: &Tensor, b: usize, texts: &[(String, String)], fast: bool) -> Result<Vec<u8>, EncodeError> {
    if t.channels != 3 || b >= t.batch {
        return Err(EncodeError::Shape(t.shape_text()));
    }
    let (w, h) = (
        u32::try_from(t.width).map_err(|_| EncodeError::Shape(t.shape_text()))?,
        u32::try_from(t.height).map_err(|_| EncodeError::Shape(t.shape_text()))?,
    );
    let start = t.index(b, 0, 0, 0);
    let bytes: Vec<u8> = t.data[start..start + t.width * t.height * 3].iter().map(|&v| to_u8(v)).collect();
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(if fast { png::Compression::Fast } else { png::Compression::Default });
        for (key, text) in texts {
            enc.add_text_chunk(key.clone(), text.clone())?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&bytes)?;
        writer.finish()?;
    }
    Ok(out)
}

/// Reads an 8-bit PNG into `(width, height, RGB bytes)`; a helper for tests.
pub fn png_rgb8(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), DecodeError> {
    let (image, _) = decode_png(bytes)?;
    let rgb = image.data.iter().map(|&v| (v * 255.0).round() as u8).collect();
    Ok((image.width as u32, image.height as u32, rgb))
}

/// The `tEXt` chunks of a PNG, in file order; a helper for tests.
pub fn png_texts(bytes: &[u8]) -> Result<Vec<(String, String)>, DecodeError> {
    let decoder = png::Decoder::new(bytes);
    let reader = decoder.read_info()?;
    Ok(reader.info().uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize) -> Tensor {
        Tensor { batch: 1, height: 1, width: w, channels: 1, data: (0..w).map(|i| i as f32).collect() }
    }

    #[test]
    fn bilinear_halving_averages_pairs() {
        let out = resize(&ramp(4), 2, 1, Method::Bilinear).unwrap();
        assert_eq!(out.data, vec![0.5, 2.5]);
    }

    #[test]
    fn bilinear_upscale_matches_torch() {
        // torch: F.interpolate(tensor([[[[0.,1.]]]]), size=(1,4), mode="bilinear") = [0, .25, .75, 1]
        let out = resize(&ramp(2), 4, 1, Method::Bilinear).unwrap();
        assert_eq!(out.data, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn nearest_exact_and_area() {
        assert_eq!(resize(&ramp(4), 2, 1, Method::NearestExact).unwrap().data, vec![1.0, 3.0]);
        assert_eq!(resize(&ramp(3), 2, 1, Method::Area).unwrap().data, vec![0.5, 1.5]);
    }

    #[test]
    fn lanczos_keeps_flat_images_flat() {
        let t = Tensor::filled(1, 8, 8, 3, |c| [0.2, 0.5, 1.0][c]).unwrap();
        let out = resize(&t, 3, 5, Method::Lanczos).unwrap();
        assert!(out.data.chunks(3).all(|p| p == [51.0 / 255.0, 127.0 / 255.0, 1.0]));
    }

    #[test]
    fn png_round_trip() {
        let t = Tensor::filled(1, 2, 3, 3, |c| [0.0, 0.5, 1.0][c]).unwrap();
        let png = encode_png(&t, 0, &[("prompt".into(), "{}".into())], true).unwrap();
        let (w, h, rgb) = png_rgb8(&png).unwrap();
        assert_eq!((w, h), (3, 2));
        assert_eq!(&rgb[..3], &[0, 127, 255]);
        assert_eq!(png_texts(&png).unwrap(), vec![("prompt".to_string(), "{}".to_string())]);
    }
}
