//! GStreamer sources: a pipeline description per kind, ending in an appsink that anomalyd asks for
//! RGB. The appsink holds at most one buffer and never drops: each sample is copied (row by row, by
//! stride) into the camera's intake at once, which SKIPs it explicitly when the queue is full.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use image::RgbImage;

use super::SourceEnd;
use crate::config::source::SourceConfig;
use crate::source::intake::Intake;

fn init() -> Result<(), String> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| gst::init().map_err(|e| format!("GStreamer failed to initialise: {e}"))).clone()
}

/// Ok when the element's plugin is installed; otherwise which package to install.
pub fn check_element(name: &str) -> Result<(), String> {
    init()?;
    if gst::ElementFactory::find(name).is_some() {
        return Ok(());
    }
    let package = match name {
        "aravissrc" => "gstreamer1.0-plugins-aravis (or aravis built with its GStreamer plugin)",
        "v4l2src" => "gstreamer1.0-plugins-good",
        "videotestsrc" | "uridecodebin" | "videoconvert" | "appsink" => "gstreamer1.0-plugins-base",
        _ => "the GStreamer plugin that provides it",
    };
    Err(format!("GStreamer element `{name}` is not installed: install {package}"))
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The pipeline description of a GStreamer source kind.
pub fn description(cfg: &SourceConfig) -> String {
    const TAIL: &str = "videoconvert ! appsink name=sink";
    match cfg {
        SourceConfig::Test { pattern, width, height, fps, frames } => {
            let n = if *frames == 0 { -1 } else { *frames as i64 };
            format!(
                "videotestsrc pattern={} is-live=true num-buffers={n} ! video/x-raw,width={width},height={height},framerate={fps}/1 ! {TAIL}",
                quote(pattern)
            )
        }
        SourceConfig::Uri { uri } => format!("uridecodebin uri={} ! {TAIL}", quote(uri)),
        SourceConfig::V4l2 { device, width, height, fps } => {
            let mut caps = Vec::new();
            if *width > 0 {
                caps.push(format!("width={width}"));
            }
            if *height > 0 {
                caps.push(format!("height={height}"));
            }
            if *fps > 0 {
                caps.push(format!("framerate={fps}/1"));
            }
            // Raw or MJPEG, whichever the camera offers in that mode; decodebin handles both.
            let filter = if caps.is_empty() {
                String::new()
            } else {
                let c = caps.join(",");
                format!("! capsfilter caps=\"video/x-raw,{c};image/jpeg,{c}\" ")
            };
            format!("v4l2src device={} {filter}! decodebin ! {TAIL}", quote(device))
        }
        SourceConfig::Aravis { camera } => match camera {
            Some(c) => format!("aravissrc camera-name={} ! {TAIL}", quote(c)),
            None => format!("aravissrc ! {TAIL}"),
        },
        SourceConfig::Pipeline { description } => description.clone(),
        SourceConfig::Files { .. } | SourceConfig::Demo { .. } => String::new(),
    }
}

fn sample_to_rgb(sample: &gst::Sample) -> Result<RgbImage, String> {
    let buffer = sample.buffer().ok_or("sample without a buffer")?;
    let caps = sample.caps().ok_or("sample without caps")?;
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| format!("caps {caps}: {e}"))?;
    if info.format() != gst_video::VideoFormat::Rgb {
        return Err(format!("expected RGB frames, got {:?}", info.format()));
    }
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).map_err(|e| e.to_string())?;
    let stride = frame.plane_stride()[0].max(0) as usize;
    let data = frame.plane_data(0).map_err(|e| e.to_string())?;
    crate::util::imageio::rgb_from_strided(data, info.width() as usize, info.height() as usize, stride)
        .map_err(|e| e.to_string())
}

/// Runs a pipeline until EOS, an error or the intake's stop flag; always leaves it in `Null`.
pub fn run(description: &str, intake: Intake) -> SourceEnd {
    let name = intake.camera.name.clone();
    let pipeline = match build(description, intake.clone()) {
        Ok(p) => p,
        Err(e) => return SourceEnd::Failed(e),
    };
    let end = watch(&pipeline, &intake);
    let _ = pipeline.set_state(gst::State::Null);
    tracing::info!(camera = %name, "source ended: {end:?}");
    end
}

fn build(description: &str, intake: Intake) -> Result<gst::Pipeline, String> {
    let element = gst::parse::launch(description).map_err(|e| format!("pipeline {description:?}: {e}"))?;
    let pipeline = match element.downcast::<gst::Pipeline>() {
        Ok(p) => p,
        Err(single) => {
            let p = gst::Pipeline::new();
            p.add(&single).map_err(|e| e.to_string())?;
            p
        }
    };
    let appsink = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or_else(|| format!("pipeline {description:?} has no `appsink name=sink`"))?;
    appsink.set_caps(Some(&gst::Caps::builder("video/x-raw").field("format", "RGB").build()));
    appsink.set_max_buffers(1);
    appsink.set_drop(false);
    appsink.set_sync(false);
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |appsink| {
                let (captured, at) = (SystemTime::now(), Instant::now());
                let sample = appsink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                intake.offer(sample_to_rgb(&sample), captured, at);
                if intake.stopping() { Err(gst::FlowError::Flushing) } else { Ok(gst::FlowSuccess::Ok) }
            })
            .build(),
    );
    pipeline.set_state(gst::State::Playing).map_err(|e| format!("pipeline {description:?} would not start: {e}"))?;
    Ok(pipeline)
}

fn watch(pipeline: &gst::Pipeline, intake: &Intake) -> SourceEnd {
    let Some(bus) = pipeline.bus() else { return SourceEnd::Failed("pipeline has no bus".into()) };
    loop {
        if intake.stopping() {
            break SourceEnd::Stopped;
        }
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        match msg.view() {
            gst::MessageView::Eos(_) => break SourceEnd::Eos,
            gst::MessageView::Error(err) => {
                let debug = err.debug().map(|d| format!(" ({d})")).unwrap_or_default();
                break SourceEnd::Failed(format!("{}{debug}", err.error()));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_against_pipeline_injection() {
        let d = description(&SourceConfig::Uri { uri: "file:///a\" ! fakesink".into() });
        assert!(d.starts_with("uridecodebin uri=\"file:///a\\\" ! fakesink\""), "{d}");
    }
}
