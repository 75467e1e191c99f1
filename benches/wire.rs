//! Criterion bench of what each verdict costs on the MQTT link before it is handed to the client: its
//! JSON body (the default) against its Sparkplug B DDATA (`[mqtt.sparkplug]`). Benchmarks, not timed
//! tests.

use anomalyd::config::daemon::{SparkplugConfig, Trigger};
use anomalyd::sink::sparkplug::Node;
use anomalyd::source::intake::Intake;
use anomalyd::types::findings::Region;
use anomalyd::types::verdict::Outcome;
use criterion::{Criterion, criterion_group, criterion_main};

fn wire(c: &mut Criterion) {
    let cam = Intake::new_test("station", 1, true, Trigger::Triggered).intake.camera;
    let mut msg = cam.skeleton(7, "station-0-7".into(), Some("P-000731".into()), std::time::SystemTime::now(), None);
    msg.verdict = Outcome::Ng;
    msg.score = Some(41.5);
    msg.threshold = Some(33.25);
    msg.answer = Some("Yes, there is an anomaly in the image, at the top left of the image.".into());
    let region: Region =
        serde_json::from_str(r#"{"bbox":[212,160,61,52],"area_pct":2.9,"cell":"bottom_right","peak":61.2}"#).unwrap();
    msg.regions = vec![region; 2];
    let cfg = SparkplugConfig { enabled: true, ..SparkplugConfig::default() };
    let node = Node::new(&cfg, "line-3", &["station".into()], None);
    c.bench_function("verdict as JSON", |b| b.iter(|| serde_json::to_vec(std::hint::black_box(&msg)).unwrap()));
    c.bench_function("verdict as Sparkplug B DDATA", |b| b.iter(|| node.ddata(std::hint::black_box(&msg))));
}

criterion_group!(benches, wire);
criterion_main!(benches);
